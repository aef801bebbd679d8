//! Target `device_queue`: the backend's [`DeviceQueue`] over a ring area that a hostile driver
//! writes, with indirect tables served through the fetch closure.
//!
//! The input is a script: the driver writes descriptors, offers heads, moves `avail.idx`,
//! flags and `used_event`, or writes raw bytes anywhere in the ring area; the device pops
//! chains, adds used elements, and decides about notifications. Checked after every step:
//! - nothing panics;
//! - a popped chain obeys `docs/PROTOCOL.md` section 11 (1 to `size` descriptors, readable
//!   before writable, total length at most `u32::MAX`, head inside the table) and equals what
//!   an independent model of the split ring (written from virtio 1.2 section 2.7) finds;
//!   whatever the model refuses is refused;
//! - an indirect table is fetched at most once per pop, and popping never writes the ring;
//! - `add_used`, `enable_notification` and `disable_notification` write only the fields they
//!   own, and `needs_notification` answers as 2.7.10 says;
//! - the same input gives the same transcript twice.

use std::sync::atomic::Ordering;

use xenvirtio_virtio::device_queue::{Chain, ChainDescriptor, DeviceQueue};
use xenvirtio_virtio::features::{bit, transport};
use xenvirtio_virtio::split::{
    DESCRIPTOR_SIZE, Descriptor, RingLayout, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY, need_event,
};
use xenvirtio_xen::mem::{PageBuf, SharedMem};

use crate::input::{Reader, Structured, Writer};

/// Largest queue size the target builds (`1 << 8`); larger sizes add nothing but time.
const MAX_SIZE_LOG2: u8 = 8;

/// One fuzz input: the queue's shape and the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInput {
    /// The queue size is `1 << (size_log2 % 9)`.
    pub size_log2: u8,
    /// Bit 0: `RING_EVENT_IDX`; bit 1: `RING_INDIRECT_DESC`.
    pub features: u8,
    /// Indirect tables; a fetch at address `a` serves table `a % len`, zero-padded or cut to
    /// the length asked for.
    pub tables: Vec<Vec<Descriptor>>,
    /// When non-zero, fetches at odd addresses return this many bytes too few (a broken
    /// resolver), which the queue must refuse.
    pub short_fetch: u8,
    /// The script.
    pub ops: Vec<QueueOp>,
}

/// A write by the (hostile) driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingWrite {
    /// Descriptor `index % size` of the table.
    Desc {
        /// Table index (taken modulo the size).
        index: u16,
        /// The descriptor.
        desc: Descriptor,
    },
    /// Puts `head` in the next available slot and increments `avail.idx`.
    Offer {
        /// The head index, not checked.
        head: u16,
    },
    /// Sets `avail.idx`.
    AvailIdx(u16),
    /// Sets `avail.flags`.
    AvailFlags(u16),
    /// Sets `used_event`.
    UsedEvent(u16),
    /// Raw bytes at an offset (modulo the ring area).
    Bytes {
        /// Offset.
        offset: u16,
        /// Bytes, cut at the end of the area.
        bytes: Vec<u8>,
    },
}

/// One step of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueOp {
    /// The driver writes the ring.
    Write(RingWrite),
    /// The device pops a chain.
    Pop,
    /// The device returns a chain: a head it popped (`pick` among them) or, with `raw`, any
    /// index.
    AddUsed {
        /// Which popped head.
        pick: u8,
        /// Use `raw_head` instead.
        raw: bool,
        /// A head of the device's choosing.
        raw_head: u16,
        /// Bytes written.
        len: u32,
    },
    /// `needs_notification`.
    NeedsNotification,
    /// `enable_notification`.
    EnableNotification,
    /// `disable_notification`.
    DisableNotification,
}

fn read_desc(r: &mut Reader<'_>) -> Descriptor {
    Descriptor {
        addr: r.u64(),
        len: r.u32(),
        flags: r.u16(),
        next: r.u16(),
    }
}

fn write_desc(w: &mut Writer, d: &Descriptor) {
    w.u64(d.addr);
    w.u32(d.len);
    w.u16(d.flags);
    w.u16(d.next);
}

impl Structured for RingWrite {
    fn read(r: &mut Reader<'_>) -> Self {
        match r.choice(6) {
            0 => RingWrite::Desc {
                index: r.u16(),
                desc: read_desc(r),
            },
            1 => RingWrite::Offer { head: r.u16() },
            2 => RingWrite::AvailIdx(r.u16()),
            3 => RingWrite::AvailFlags(r.u16()),
            4 => RingWrite::UsedEvent(r.u16()),
            _ => RingWrite::Bytes {
                offset: r.u16(),
                bytes: r.bytes(64),
            },
        }
    }

    fn write(&self, w: &mut Writer) {
        match self {
            RingWrite::Desc { index, desc } => {
                w.choice(0, 6);
                w.u16(*index);
                write_desc(w, desc);
            }
            RingWrite::Offer { head } => {
                w.choice(1, 6);
                w.u16(*head);
            }
            RingWrite::AvailIdx(v) => {
                w.choice(2, 6);
                w.u16(*v);
            }
            RingWrite::AvailFlags(v) => {
                w.choice(3, 6);
                w.u16(*v);
            }
            RingWrite::UsedEvent(v) => {
                w.choice(4, 6);
                w.u16(*v);
            }
            RingWrite::Bytes { offset, bytes } => {
                w.choice(5, 6);
                w.u16(*offset);
                w.bytes(bytes, 64);
            }
        }
    }
}

impl Structured for QueueOp {
    fn read(r: &mut Reader<'_>) -> Self {
        // Writes are as likely as every device step together.
        match r.choice(10) {
            0..=4 => QueueOp::Write(RingWrite::read(r)),
            5 => QueueOp::Pop,
            6 => QueueOp::AddUsed {
                pick: r.u8(),
                raw: r.bool(),
                raw_head: r.u16(),
                len: r.u32(),
            },
            7 => QueueOp::NeedsNotification,
            8 => QueueOp::EnableNotification,
            _ => QueueOp::DisableNotification,
        }
    }

    fn write(&self, w: &mut Writer) {
        match self {
            QueueOp::Write(rw) => {
                w.choice(0, 10);
                rw.write(w);
            }
            QueueOp::Pop => w.choice(5, 10),
            QueueOp::AddUsed {
                pick,
                raw,
                raw_head,
                len,
            } => {
                w.choice(6, 10);
                w.u8(*pick);
                w.bool(*raw);
                w.u16(*raw_head);
                w.u32(*len);
            }
            QueueOp::NeedsNotification => w.choice(7, 10),
            QueueOp::EnableNotification => w.choice(8, 10),
            QueueOp::DisableNotification => w.choice(9, 10),
        }
    }
}

impl Structured for QueueInput {
    fn read(r: &mut Reader<'_>) -> Self {
        Self {
            size_log2: r.u8(),
            features: r.u8(),
            tables: r.list(4, |r| r.list(20, read_desc)),
            short_fetch: r.u8(),
            ops: r.list(64, QueueOp::read),
        }
    }

    fn write(&self, w: &mut Writer) {
        w.u8(self.size_log2);
        w.u8(self.features);
        w.list(&self.tables, 4, |w, t| w.list(t, 20, write_desc));
        w.u8(self.short_fetch);
        w.list(&self.ops, 64, |w, op| op.write(w));
    }
}

crate::structured_input!(QueueInput);

impl QueueInput {
    fn size(&self) -> u16 {
        1 << (self.size_log2 % (MAX_SIZE_LOG2 + 1))
    }

    fn event_idx(&self) -> bool {
        self.features & 1 != 0
    }

    fn indirect(&self) -> bool {
        self.features & 2 != 0
    }

    fn feature_bits(&self) -> u64 {
        let mut f = bit(transport::VERSION_1);
        if self.event_idx() {
            f |= bit(transport::RING_EVENT_IDX);
        }
        if self.indirect() {
            f |= bit(transport::RING_INDIRECT_DESC);
        }
        f
    }

    /// The indirect-table resolver both the queue and the model use.
    fn serve(&self, addr: u64, len: u32) -> Result<Vec<u8>, String> {
        if self.tables.is_empty() {
            return Err(format!("nothing mapped at {addr:#x}"));
        }
        let table = &self.tables[(addr % self.tables.len() as u64) as usize];
        let mut bytes: Vec<u8> = table.iter().flat_map(Descriptor::to_bytes).collect();
        // The queue asks for at most 16 * size bytes: bounded.
        bytes.resize(len as usize, 0);
        if self.short_fetch != 0 && addr & 1 == 1 {
            let cut = usize::from(self.short_fetch).min(bytes.len());
            bytes.truncate(bytes.len() - cut);
        }
        Ok(bytes)
    }
}

/// Runs the script twice and checks that both runs say the same.
pub fn run(input: &QueueInput) {
    let first = run_once(input);
    let second = run_once(input);
    assert_eq!(first, second, "the same ring gave different results");
}

/// What the model of the split ring expects from one pop.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Empty,
    Chain(Chain),
    Refused,
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// An independent reading of virtio 1.2 2.7.5 and 2.7.13 with the limits of PROTOCOL.md
/// section 11, over a private snapshot of the ring.
fn model_pop(
    input: &QueueInput,
    layout: RingLayout,
    ring: &[u8],
    next_avail: &mut u16,
) -> Expected {
    let size = layout.size();
    let avail_idx = le16(ring, layout.avail_idx());
    let ahead = avail_idx.wrapping_sub(*next_avail);
    if ahead > size {
        return Expected::Refused;
    }
    if ahead == 0 {
        return Expected::Empty;
    }
    let head = le16(ring, layout.avail_ring(*next_avail));
    *next_avail = next_avail.wrapping_add(1);

    let mut out: Vec<ChainDescriptor> = Vec::new();
    let mut total = 0u64;
    let mut push = |d: &Descriptor| -> bool {
        let writable = d.flags & VIRTQ_DESC_F_WRITE != 0;
        if out.len() >= usize::from(size) || (!writable && out.last().is_some_and(|p| p.writable)) {
            return false;
        }
        total += u64::from(d.len);
        out.push(ChainDescriptor {
            addr: d.addr,
            len: d.len,
            writable,
        });
        total <= u64::from(u32::MAX)
    };
    let mut index = head;
    loop {
        if index >= size {
            return Expected::Refused;
        }
        let at = usize::from(index) * DESCRIPTOR_SIZE;
        let raw: [u8; DESCRIPTOR_SIZE] =
            ring[at..at + DESCRIPTOR_SIZE].try_into().expect("16 bytes");
        let d = Descriptor::from_bytes(&raw);
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            let len_ok = d.len != 0
                && d.len.is_multiple_of(DESCRIPTOR_SIZE as u32)
                && d.len <= u32::from(size) * DESCRIPTOR_SIZE as u32;
            if !input.indirect() || d.flags & VIRTQ_DESC_F_NEXT != 0 || !len_ok {
                return Expected::Refused;
            }
            let Ok(table) = input.serve(d.addr, d.len) else {
                return Expected::Refused;
            };
            if table.len() != d.len as usize {
                return Expected::Refused;
            }
            let entries = table.len() / DESCRIPTOR_SIZE;
            let mut j = 0usize;
            loop {
                if j >= entries {
                    return Expected::Refused;
                }
                let raw: [u8; DESCRIPTOR_SIZE] =
                    table[j * 16..j * 16 + 16].try_into().expect("16 bytes");
                let e = Descriptor::from_bytes(&raw);
                if e.flags & VIRTQ_DESC_F_INDIRECT != 0 || !push(&e) {
                    return Expected::Refused;
                }
                if e.flags & VIRTQ_DESC_F_NEXT == 0 {
                    break;
                }
                j = usize::from(e.next);
            }
            break;
        }
        if !push(&d) {
            return Expected::Refused;
        }
        if d.flags & VIRTQ_DESC_F_NEXT == 0 {
            break;
        }
        index = d.next;
    }
    Expected::Chain(Chain {
        head,
        descriptors: out,
    })
}

/// Asserts that `after` differs from `before` only inside `allowed` byte ranges.
fn assert_changed_only(before: &[u8], after: &[u8], allowed: &[(usize, usize)], what: &str) {
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        if b != a {
            assert!(
                allowed
                    .iter()
                    .any(|&(start, len)| (start..start + len).contains(&i)),
                "{what} changed ring byte {i} ({b:#x} -> {a:#x}), outside {allowed:?}"
            );
        }
    }
}

fn check_chain_rules(chain: &Chain, size: u16) {
    assert!(chain.head < size, "head {} outside the table", chain.head);
    let n = chain.descriptors.len();
    assert!(
        (1..=usize::from(size)).contains(&n),
        "a chain of {n} descriptors"
    );
    let first_writable = chain
        .descriptors
        .iter()
        .position(|d| d.writable)
        .unwrap_or(n);
    assert!(
        chain.descriptors[first_writable..]
            .iter()
            .all(|d| d.writable),
        "readable after writable: {chain:?}"
    );
    let total: u64 = chain.descriptors.iter().map(|d| u64::from(d.len)).sum();
    assert!(total <= u64::from(u32::MAX), "total length {total}");
    assert_eq!(
        u64::from(chain.readable_len()) + u64::from(chain.writable_len()),
        total
    );
}

fn apply_write(w: &RingWrite, layout: RingLayout, ring: &SharedMem<'_>) {
    let size = layout.size();
    match w {
        RingWrite::Desc { index, desc } => ring
            .write(layout.desc(index % size), &desc.to_bytes())
            .expect("inside the table"),
        RingWrite::Offer { head } => {
            let idx = ring
                .load_u16(layout.avail_idx(), Ordering::Acquire)
                .expect("aligned");
            ring.write(layout.avail_ring(idx), &head.to_le_bytes())
                .expect("inside the ring");
            ring.store_u16(layout.avail_idx(), idx.wrapping_add(1), Ordering::Release)
                .expect("aligned");
        }
        RingWrite::AvailIdx(v) => ring
            .store_u16(layout.avail_idx(), *v, Ordering::Release)
            .expect("aligned"),
        RingWrite::AvailFlags(v) => ring
            .store_u16(layout.avail_flags(), *v, Ordering::Release)
            .expect("aligned"),
        RingWrite::UsedEvent(v) => ring
            .store_u16(layout.used_event(), *v, Ordering::Release)
            .expect("aligned"),
        RingWrite::Bytes { offset, bytes } => {
            let at = usize::from(*offset) % ring.len();
            let n = bytes.len().min(ring.len() - at);
            ring.write(at, &bytes[..n]).expect("cut to the area");
        }
    }
}

fn run_once(input: &QueueInput) -> Vec<String> {
    let size = input.size();
    let layout = RingLayout::new(u32::from(size), 1 << MAX_SIZE_LOG2).expect("a power of two");
    let buf = PageBuf::new(layout.pages());
    let ring = buf
        .mem()
        .slice(0, layout.pages() * 4096)
        .expect("the buffer holds the area");
    let mut queue = DeviceQueue::new(layout, input.feature_bits());
    let mut model_next_avail = 0u16;
    let mut model_signalled = 0u16;
    let mut popped: Vec<u16> = Vec::new();
    let mut transcript = Vec::new();

    for op in &input.ops {
        let before = crate::snapshot(&ring);
        match op {
            QueueOp::Write(w) => apply_write(w, layout, &ring),
            QueueOp::Pop => {
                let expected = model_pop(input, layout, &before, &mut model_next_avail);
                let mut fetches = 0;
                let got = queue.pop_chain(&ring, &mut |addr, len| {
                    fetches += 1;
                    input.serve(addr, len)
                });
                assert!(
                    fetches <= 1,
                    "{fetches} fetches of indirect tables in one pop"
                );
                assert_eq!(before, crate::snapshot(&ring), "popping wrote the ring");
                match (&got, &expected) {
                    (Ok(None), Expected::Empty) | (Err(_), Expected::Refused) => {}
                    (Ok(Some(chain)), Expected::Chain(want)) => {
                        check_chain_rules(chain, size);
                        assert_eq!(chain, want, "the queue and the model disagree");
                        popped.push(chain.head);
                    }
                    _ => panic!("pop gave {got:?}, the model expected {expected:?}"),
                }
                assert_eq!(queue.next_avail(), model_next_avail, "next_avail");
                transcript.push(format!("{got:?}"));
            }
            QueueOp::AddUsed {
                pick,
                raw,
                raw_head,
                len,
            } => {
                let head = if *raw || popped.is_empty() {
                    *raw_head
                } else {
                    popped[usize::from(*pick) % popped.len()]
                };
                let slot = layout.used_ring(queue.next_used());
                let result = queue.add_used(&ring, head, *len);
                assert!(result.is_ok(), "add_used on a writable ring: {result:?}");
                let after = crate::snapshot(&ring);
                assert_changed_only(
                    &before,
                    &after,
                    &[(slot, 8), (layout.used_idx(), 2)],
                    "add_used",
                );
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
                elem[4..].copy_from_slice(&len.to_le_bytes());
                assert_eq!(after[slot..slot + 8], elem, "the used element");
                assert_eq!(le16(&after, layout.used_idx()), queue.next_used());
            }
            QueueOp::NeedsNotification => {
                let new = queue.next_used();
                let old = std::mem::replace(&mut model_signalled, new);
                let want = if input.event_idx() {
                    need_event(le16(&before, layout.used_event()), new, old)
                } else {
                    old != new
                        && le16(&before, layout.avail_flags()) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
                };
                let got = queue.needs_notification(&ring).expect("a readable ring");
                assert_eq!(got, want, "needs_notification (old {old}, new {new})");
                assert_eq!(
                    before,
                    crate::snapshot(&ring),
                    "needs_notification wrote the ring"
                );
                transcript.push(format!("notify {got}"));
            }
            QueueOp::EnableNotification => {
                let got = queue.enable_notification(&ring);
                let after = crate::snapshot(&ring);
                let field = if input.event_idx() {
                    assert_eq!(le16(&after, layout.avail_event()), queue.next_avail());
                    layout.avail_event()
                } else {
                    assert_eq!(le16(&after, layout.used_flags()), 0);
                    layout.used_flags()
                };
                assert_changed_only(&before, &after, &[(field, 2)], "enable_notification");
                let ahead = le16(&after, layout.avail_idx()).wrapping_sub(queue.next_avail());
                match &got {
                    Ok(pending) => assert_eq!(*pending, ahead != 0, "pending work"),
                    Err(_) => assert!(ahead > size, "refused with {ahead} pending: {got:?}"),
                }
                transcript.push(format!("enable {got:?}"));
            }
            QueueOp::DisableNotification => {
                queue.disable_notification(&ring).expect("a writable ring");
                let after = crate::snapshot(&ring);
                if input.event_idx() {
                    assert_eq!(before, after, "disable with EVENT_IDX writes nothing");
                } else {
                    assert_changed_only(
                        &before,
                        &after,
                        &[(layout.used_flags(), 2)],
                        "disable_notification",
                    );
                    assert_eq!(le16(&after, layout.used_flags()), VIRTQ_USED_F_NO_NOTIFY);
                }
            }
        }
    }
    transcript
}

/// Seeds: the cases of the unit tests in `backend/src/virtqueue.rs`, as scripts.
pub fn seeds() -> Vec<(&'static str, QueueInput)> {
    let d = |index: u16, addr: u64, len: u32, flags: u16, next: u16| {
        QueueOp::Write(RingWrite::Desc {
            index,
            desc: Descriptor {
                addr,
                len,
                flags,
                next,
            },
        })
    };
    let offer = |head| QueueOp::Write(RingWrite::Offer { head });
    let (n, w, i) = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT);
    let used = |len| QueueOp::AddUsed {
        pick: 0,
        raw: false,
        raw_head: 0,
        len,
    };
    let input = |size_log2, features, tables: Vec<Vec<Descriptor>>, ops| QueueInput {
        size_log2,
        features,
        tables,
        short_fetch: 0,
        ops,
    };
    let t = |addr, len, flags, next| Descriptor {
        addr,
        len,
        flags,
        next,
    };
    vec![
        (
            "three_descriptor_chain",
            input(
                3,
                3,
                vec![],
                vec![
                    d(3, 0x1000, 16, n, 5),
                    d(5, 0x2000, 512, n | w, 1),
                    d(1, 0x3000, 1, w, 0),
                    QueueOp::Pop,
                    offer(3),
                    QueueOp::Pop,
                    QueueOp::Pop,
                    used(513),
                    QueueOp::NeedsNotification,
                ],
            ),
        ),
        (
            "head_out_of_range",
            input(2, 3, vec![], vec![offer(4), QueueOp::Pop]),
        ),
        (
            "loop",
            input(
                2,
                3,
                vec![],
                vec![d(0, 0, 1, n, 1), d(1, 0, 1, n, 0), offer(0), QueueOp::Pop],
            ),
        ),
        (
            "readable_after_writable",
            input(
                2,
                3,
                vec![],
                vec![
                    d(0, 0, 1, n | w, 1),
                    d(1, 0, 1, 0, 0),
                    offer(0),
                    QueueOp::Pop,
                ],
            ),
        ),
        (
            "total_over_4gib",
            input(
                2,
                3,
                vec![],
                vec![
                    d(0, 0, u32::MAX, n, 1),
                    d(1, 0, 1, 0, 0),
                    offer(0),
                    QueueOp::Pop,
                ],
            ),
        ),
        (
            "avail_idx_jump",
            input(
                2,
                3,
                vec![],
                vec![QueueOp::Write(RingWrite::AvailIdx(5)), QueueOp::Pop],
            ),
        ),
        (
            "indirect_table",
            input(
                3,
                3,
                vec![vec![
                    t(0xa000, 16, n, 2),
                    t(0xdead, 1, 0, 0),
                    t(0xb000, 4096, w, 0),
                ]],
                vec![d(0, 0x7000, 48, i, 0), offer(0), QueueOp::Pop, used(4096)],
            ),
        ),
        (
            "nested_indirect",
            input(
                3,
                3,
                vec![vec![t(0, 16, i, 0)]],
                vec![d(0, 0x7000, 16, i, 1), offer(0), QueueOp::Pop],
            ),
        ),
        (
            "indirect_without_feature",
            input(
                3,
                1,
                vec![vec![t(0, 16, 0, 0)]],
                vec![d(0, 0x7000, 16, i, 0), offer(0), QueueOp::Pop],
            ),
        ),
        (
            "event_idx",
            input(
                3,
                3,
                vec![],
                vec![
                    d(0, 0, 1, w, 0),
                    d(1, 0, 1, w, 0),
                    d(2, 0, 1, w, 0),
                    QueueOp::Write(RingWrite::UsedEvent(1)),
                    offer(0),
                    offer(1),
                    offer(2),
                    QueueOp::Pop,
                    used(1),
                    QueueOp::NeedsNotification,
                    QueueOp::Pop,
                    used(1),
                    QueueOp::NeedsNotification,
                    QueueOp::EnableNotification,
                    QueueOp::Pop,
                    QueueOp::EnableNotification,
                ],
            ),
        ),
        (
            "flags_suppress",
            input(
                2,
                1,
                vec![],
                vec![
                    d(0, 0, 1, w, 0),
                    QueueOp::DisableNotification,
                    offer(0),
                    QueueOp::Pop,
                    used(0),
                    QueueOp::Write(RingWrite::AvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT)),
                    QueueOp::NeedsNotification,
                    QueueOp::Write(RingWrite::AvailFlags(0)),
                    QueueOp::NeedsNotification,
                    offer(0),
                    QueueOp::Pop,
                    used(0),
                    QueueOp::NeedsNotification,
                    QueueOp::EnableNotification,
                ],
            ),
        ),
    ]
}
