//! The virtio-blk driver (virtio 1.2 section 5.2): zero-copy queues and a blocking API.
//!
//! This module owns the meaning of blk requests on the driver side: headers, status bytes,
//! the checks made before a request is submitted (range, alignment, read-only, negotiated
//! features), and two ways to drive the device:
//!
//! - **Zero-copy.** [`BlkDevice::lock_queue`] gives a [`BlkQueue`]: allocate [`DmaBuf`]s from
//!   the device's DMA memory, fill them, `submit_*` them (each returns a [`RequestId`]), and
//!   collect [`Completion`]s with [`BlkQueue::poll`] or [`BlkQueue::wait`]. The buffer comes
//!   back in its completion; nothing is copied. Requests on one queue are in flight
//!   concurrently; each queue has its own event channel, so queues can be driven from
//!   different threads.
//! - **Blocking.** [`BlkDevice::read_at`], [`BlkDevice::write_at`], `flush`, `discard`,
//!   `write_zeroes` and `get_id` take `&self` and may be called from many threads at once.
//!   Callers' slices are bounced through DMA memory (the per-buffer rule of docs/DESIGN.md), split
//!   into requests of at most [`BlkDevice::max_request_bytes`], spread over the queues, and
//!   unaligned edges are read-modify-written. One waiting thread per queue reaps completions
//!   for every waiter (leader/follower), so a queue's requests are in flight together.
//!
//! When the backend leaves Connected, every request in flight fails with
//! [`BlkError::Stopped`] and nothing more is submitted. The device is closed (Closing, wait for
//! the backend's Closed, revoke, Closed) by [`BlkDevice::close`] or on drop.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use xenvirtio_virtio::blk::{
    BlkConfig, DISCARD_SEGMENT_SIZE, DiscardWriteZeroes, ID_BYTES, REQ_HEADER_SIZE, ReqHeader,
    S_IOERR, S_OK, S_UNSUPP, SECTOR_SIZE, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES, WRITE_ZEROES_FLAG_UNMAP,
};
use xenvirtio_virtio::features::{self, bit, blk as fb, transport as ft};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::mem::{MemError, PAGE_SIZE};
use xenvirtio_xen::platform::Platform;

use crate::dma::{Arena, DmaBuf, DmaError, DmaStats, Segment};
use crate::queue::{AddError, EventStats, QueueError, Virtqueue, Wake};
use crate::transport::{
    ConnectError, ConnectOptions, DeviceConfig, Frontend, Negotiated, QueueCount, Transport,
};

/// Bytes of the control area of one request: header at 0, discard/write-zeroes segment at 16,
/// the id buffer at 32, the status byte at 64. A slot never crosses a page.
const SLOT_SIZE: usize = 128;
const SLOT_SEGMENT: usize = 16;
const SLOT_ID: usize = 32;
const SLOT_STATUS: usize = 64;
/// Requests in flight per queue when nobody says otherwise.
pub const DEFAULT_DEPTH: u32 = 64;
/// Largest request the blocking API makes: 256 KiB (fewer if the device or memory is smaller).
const MAX_REQUEST_PAGES: usize = 64;
/// Requests one blocking call keeps in flight on its queue.
const BLOCKING_WINDOW: usize = 8;

/// The device-specific features this driver accepts.
const DRIVER_BITS: u64 = bit(fb::SIZE_MAX)
    | bit(fb::SEG_MAX)
    | bit(fb::BLK_SIZE)
    | bit(fb::RO)
    | bit(fb::FLUSH)
    | bit(fb::MQ)
    | bit(fb::DISCARD)
    | bit(fb::WRITE_ZEROES);

/// What a blk connection may be asked for, besides the transport's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkOptions {
    /// Transport options (DMA strategy and memory, queues, queue size, timeouts).
    pub connect: ConnectOptions,
    /// Requests in flight per queue (capped by the queue size).
    pub depth: u32,
    /// How long a blocking call waits for its requests before failing (`None`: forever).
    pub io_timeout: Option<Duration>,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            connect: ConnectOptions::default(),
            depth: DEFAULT_DEPTH,
            io_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// A request, as numbered by its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId {
    /// The queue.
    pub queue: u16,
    /// Sequence number on that queue.
    pub seq: u64,
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlkOp {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes {
        /// Whether the device may unmap the range.
        unmap: bool,
    },
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
}

impl std::fmt::Display for BlkOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlkOp::Read => "read",
            BlkOp::Write => "write",
            BlkOp::Flush => "flush",
            BlkOp::Discard => "discard",
            BlkOp::WriteZeroes { .. } => "write-zeroes",
            BlkOp::GetId => "get-id",
        })
    }
}

/// Errors of the blk driver.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The device answered `VIRTIO_BLK_S_IOERR`.
    #[error("the device failed the {op} at sector {sector} (I/O error)")]
    Io {
        /// The request.
        op: BlkOp,
        /// Its first sector.
        sector: u64,
    },
    /// The device answered `VIRTIO_BLK_S_UNSUPP`.
    #[error("the device does not support {op} requests")]
    Unsupported {
        /// The request.
        op: BlkOp,
    },
    /// The device answered with a status byte virtio does not define.
    #[error("the device answered the {op} with status {status}, which virtio does not define")]
    BadStatus {
        /// The request.
        op: BlkOp,
        /// The byte.
        status: u8,
    },
    /// The range is outside the disk.
    #[error("{len} bytes at offset {offset} are outside the disk of {capacity} bytes")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Disk size in bytes.
        capacity: u64,
    },
    /// A zero-copy request whose buffer is not whole sectors.
    #[error("a {op} of {len} bytes is not a whole number of 512-byte sectors")]
    Unaligned {
        /// The request.
        op: BlkOp,
        /// Bytes.
        len: usize,
    },
    /// A write to a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// A request the device did not negotiate.
    #[error("the device did not offer {feature}, which {op} needs")]
    NotNegotiated {
        /// The request.
        op: BlkOp,
        /// The missing feature.
        feature: &'static str,
    },
    /// A request larger than the device takes in one go.
    #[error("a {op} of {len} bytes is larger than the {max} bytes one request may carry")]
    TooLarge {
        /// The request.
        op: BlkOp,
        /// Bytes.
        len: usize,
        /// The limit ([`BlkDevice::max_request_bytes`], or the discard limit).
        max: u64,
    },
    /// No free request slot on the queue: wait for completions.
    #[error("queue {queue} has {depth} requests in flight already")]
    QueueFull {
        /// The queue.
        queue: u16,
        /// Its depth.
        depth: u16,
    },
    /// A buffer from another device's DMA memory.
    #[error("the buffer does not belong to this device's DMA memory")]
    ForeignBuffer,
    /// The backend left Connected, or the device is closing: the request was not done.
    #[error("the device stopped: {reason}")]
    Stopped {
        /// Why.
        reason: String,
    },
    /// A blocking call's requests did not complete in time.
    #[error("the {op} did not complete within {waited:?}")]
    Timeout {
        /// The request.
        op: BlkOp,
        /// How long it waited.
        waited: Duration,
    },
    /// The queue failed (the ring, the event channel).
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// DMA memory could not be had or accessed.
    #[error(transparent)]
    Dma(#[from] DmaError),
}

impl From<MemError> for BlkError {
    fn from(e: MemError) -> Self {
        BlkError::Dma(DmaError::Mem(e))
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The request.
    pub id: RequestId,
    /// What it did.
    pub op: BlkOp,
    /// Bytes transferred (reads and writes: the buffer's length; get-id: the id's length),
    /// or why it failed.
    pub result: Result<usize, BlkError>,
    /// The request's buffer, returned to the caller.
    pub buf: Option<DmaBuf>,
    /// Time from submission to completion.
    pub latency: Duration,
    /// get-id: the id bytes.
    pub id_bytes: Option<Vec<u8>>,
}

/// A request that was not submitted, and its buffer back.
#[derive(Debug, thiserror::Error)]
#[error("request not submitted")]
pub struct Rejected {
    /// Why.
    #[source]
    pub error: BlkError,
    /// The buffer that was passed in.
    pub buf: Option<DmaBuf>,
}

impl From<Rejected> for BlkError {
    fn from(r: Rejected) -> Self {
        r.error
    }
}

/// What every queue of one device needs to know about it.
#[derive(Debug)]
struct Geometry {
    features: u64,
    read_only: bool,
    config: Arc<Mutex<DeviceConfig>>,
    /// Largest descriptor (SIZE_MAX), and most data descriptors (SEG_MAX).
    max_piece: usize,
    max_data_segments: usize,
    bytes_done: AtomicU64,
    requests_done: AtomicU64,
}

impl Geometry {
    fn blk_config(&self) -> BlkConfig {
        BlkConfig::from_bytes(
            &self
                .config
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .bytes,
        )
    }

    fn capacity_sectors(&self) -> u64 {
        self.blk_config().capacity
    }

    fn has(&self, f: u32) -> bool {
        features::has(self.features, f)
    }
}

#[derive(Debug)]
struct Pending {
    id: RequestId,
    op: BlkOp,
    slot: u16,
    sector: u64,
    buf: Option<DmaBuf>,
    started: Instant,
    /// Submitted by the blocking API: its completion goes to the stash.
    waiter: bool,
}

/// One request queue of a blk device, for zero-copy I/O (see the module documentation).
pub struct BlkQueue<P: Platform> {
    vq: Virtqueue<P::Events, Pending>,
    control: DmaBuf,
    free_slots: Vec<u16>,
    depth: u16,
    next_seq: u64,
    ready: Vec<Completion>,
    stash: HashMap<RequestId, Completion>,
    abandoned: HashSet<RequestId>,
    polling: bool,
    arena: Arc<Arena>,
    geometry: Arc<Geometry>,
    link: Arc<crate::transport::Link>,
}

impl<P: Platform> std::fmt::Debug for BlkQueue<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkQueue")
            .field("queue", &self.vq.index())
            .field("depth", &self.depth)
            .field("in_flight", &self.vq.in_flight())
            .finish()
    }
}

impl<P: Platform> BlkQueue<P> {
    /// The queue's index.
    pub fn index(&self) -> u16 {
        self.vq.index()
    }

    /// Requests that may be in flight at once.
    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        usize::from(self.depth) - self.free_slots.len()
    }

    /// Whether another request can be submitted now.
    pub fn can_submit(&self) -> bool {
        !self.free_slots.is_empty()
    }

    /// A buffer of `len` bytes of the device's DMA memory.
    pub fn alloc(&self, len: usize) -> Result<DmaBuf, DmaError> {
        self.arena.alloc(len)
    }

    /// Reads `buf.len()` bytes at `sector` into `buf`. On refusal the buffer comes back in
    /// [`Rejected`].
    pub fn submit_read(&mut self, buf: DmaBuf, sector: u64) -> Result<RequestId, Rejected> {
        self.submit(BlkOp::Read, Some(buf), sector, 0, false)
    }

    /// Writes `buf` at `sector`. On refusal the buffer comes back in [`Rejected`].
    pub fn submit_write(&mut self, buf: DmaBuf, sector: u64) -> Result<RequestId, Rejected> {
        self.submit(BlkOp::Write, Some(buf), sector, 0, false)
    }

    /// Flushes the device's write cache.
    pub fn submit_flush(&mut self) -> Result<RequestId, Rejected> {
        self.submit(BlkOp::Flush, None, 0, 0, false)
    }

    /// Discards `sectors` sectors at `sector`.
    pub fn submit_discard(&mut self, sector: u64, sectors: u32) -> Result<RequestId, Rejected> {
        self.submit(BlkOp::Discard, None, sector, sectors, false)
    }

    /// Zeroes `sectors` sectors at `sector` (the device may unmap them if `unmap`).
    pub fn submit_write_zeroes(
        &mut self,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<RequestId, Rejected> {
        self.submit(BlkOp::WriteZeroes { unmap }, None, sector, sectors, false)
    }

    /// Asks for the device's id string (up to 20 bytes).
    pub fn submit_get_id(&mut self) -> Result<RequestId, Rejected> {
        self.submit(BlkOp::GetId, None, 0, 0, false)
    }

    /// The completions available now (without blocking).
    pub fn poll(&mut self) -> Result<Vec<Completion>, BlkError> {
        self.reap()?;
        Ok(std::mem::take(&mut self.ready))
    }

    /// Waits up to `timeout` (forever with `None`) for at least one completion, and returns
    /// all that are available. An empty result means the timeout passed. If the backend left
    /// Connected, every request in flight completes with [`BlkError::Stopped`].
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Vec<Completion>, BlkError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            self.reap()?;
            if !self.ready.is_empty() {
                return Ok(std::mem::take(&mut self.ready));
            }
            if self.in_flight() == 0 {
                return Ok(Vec::new());
            }
            // A blocking caller polling this queue may take the notification meant for these
            // requests while this thread holds the queue; `seen` makes the wait notice.
            let Some(seen) = self.vq.arm()? else {
                continue;
            };
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(Vec::new());
            }
            let events = Arc::clone(self.vq.events());
            events.wait(seen, left)?;
            self.vq.disable_callbacks()?;
        }
    }

    fn slot_offset(slot: u16) -> usize {
        usize::from(slot) * SLOT_SIZE
    }

    fn check_range(&self, op: BlkOp, sector: u64, bytes: u64) -> Result<(), BlkError> {
        let capacity = self.geometry.capacity_sectors();
        let end = sector.checked_add(bytes.div_ceil(SECTOR_SIZE));
        if end.is_none_or(|e| e > capacity) {
            let _ = op;
            return Err(BlkError::OutOfRange {
                offset: sector.saturating_mul(SECTOR_SIZE),
                len: bytes,
                capacity: capacity.saturating_mul(SECTOR_SIZE),
            });
        }
        Ok(())
    }

    fn submit(
        &mut self,
        op: BlkOp,
        buf: Option<DmaBuf>,
        sector: u64,
        sectors: u32,
        waiter: bool,
    ) -> Result<RequestId, Rejected> {
        if let Err(error) = self.check(op, buf.as_ref(), sector, sectors) {
            return Err(Rejected { error, buf });
        }
        let Some(slot) = self.free_slots.pop() else {
            return Err(Rejected {
                error: BlkError::QueueFull {
                    queue: self.index(),
                    depth: self.depth,
                },
                buf,
            });
        };
        match self.build_and_add(op, buf, sector, sectors, slot, waiter) {
            Ok(id) => Ok(id),
            Err(rejected) => {
                self.free_slots.push(slot);
                Err(rejected)
            }
        }
    }

    /// The checks a request passes before it takes a slot.
    fn check(
        &self,
        op: BlkOp,
        buf: Option<&DmaBuf>,
        sector: u64,
        sectors: u32,
    ) -> Result<(), BlkError> {
        if let Some(reason) = self.link.lost() {
            return Err(BlkError::Stopped { reason });
        }
        let g = &self.geometry;
        match op {
            BlkOp::Read | BlkOp::Write => {
                let len = buf.map_or(0, DmaBuf::len);
                if len == 0 || len as u64 % SECTOR_SIZE != 0 {
                    return Err(BlkError::Unaligned { op, len });
                }
                if op == BlkOp::Write && g.read_only {
                    return Err(BlkError::ReadOnly);
                }
                self.check_range(op, sector, len as u64)?;
            }
            BlkOp::Flush => {
                if !g.has(fb::FLUSH) {
                    return Err(BlkError::NotNegotiated {
                        op,
                        feature: "FLUSH",
                    });
                }
            }
            BlkOp::Discard | BlkOp::WriteZeroes { .. } => {
                let config = g.blk_config();
                let (feature, bit_needed, max) = if op == BlkOp::Discard {
                    ("DISCARD", fb::DISCARD, config.max_discard_sectors)
                } else {
                    (
                        "WRITE_ZEROES",
                        fb::WRITE_ZEROES,
                        config.max_write_zeroes_sectors,
                    )
                };
                if !g.has(bit_needed) {
                    return Err(BlkError::NotNegotiated { op, feature });
                }
                if g.read_only {
                    return Err(BlkError::ReadOnly);
                }
                if sectors == 0 || (max != 0 && sectors > max) {
                    return Err(BlkError::TooLarge {
                        op,
                        len: sectors as usize * SECTOR_SIZE as usize,
                        max: u64::from(max) * SECTOR_SIZE,
                    });
                }
                self.check_range(op, sector, u64::from(sectors) * SECTOR_SIZE)?;
            }
            BlkOp::GetId => {}
        }
        if let Some(b) = buf {
            if !b.same_arena(&self.arena) {
                return Err(BlkError::ForeignBuffer);
            }
            if op != BlkOp::Read && op != BlkOp::Write {
                return Err(BlkError::ForeignBuffer);
            }
        }
        Ok(())
    }

    fn build_and_add(
        &mut self,
        op: BlkOp,
        buf: Option<DmaBuf>,
        sector: u64,
        sectors: u32,
        slot: u16,
        waiter: bool,
    ) -> Result<RequestId, Rejected> {
        let base = Self::slot_offset(slot);
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        if let Err(error) = self.describe(
            op,
            buf.as_ref(),
            sector,
            sectors,
            base,
            &mut readable,
            &mut writable,
        ) {
            return Err(Rejected { error, buf });
        }
        let id = RequestId {
            queue: self.index(),
            seq: self.next_seq,
        };
        let pending = Pending {
            id,
            op,
            slot,
            sector,
            buf,
            started: Instant::now(),
            waiter,
        };
        match self.vq.add(&readable, &writable, pending) {
            Ok(_) => {}
            Err(AddError::Busy(pending)) => {
                return Err(Rejected {
                    error: BlkError::QueueFull {
                        queue: self.index(),
                        depth: self.depth,
                    },
                    buf: pending.buf,
                });
            }
            Err(AddError::Failed(e)) => {
                return Err(Rejected {
                    error: e.into(),
                    buf: None,
                });
            }
        }
        self.next_seq += 1;
        if let Err(e) = self.vq.kick() {
            // The chain is in the ring; the backend will see it at the next kick or never.
            return Err(Rejected {
                error: e.into(),
                buf: None,
            });
        }
        Ok(id)
    }

    /// Writes the request's header (and segment) into its slot and lists its descriptors.
    #[allow(clippy::too_many_arguments)]
    fn describe(
        &self,
        op: BlkOp,
        buf: Option<&DmaBuf>,
        sector: u64,
        sectors: u32,
        base: usize,
        readable: &mut Vec<Segment>,
        writable: &mut Vec<Segment>,
    ) -> Result<(), BlkError> {
        let req_type = match op {
            BlkOp::Read => T_IN,
            BlkOp::Write => T_OUT,
            BlkOp::Flush => T_FLUSH,
            BlkOp::Discard => T_DISCARD,
            BlkOp::WriteZeroes { .. } => T_WRITE_ZEROES,
            BlkOp::GetId => T_GET_ID,
        };
        let header = ReqHeader {
            req_type,
            reserved: 0,
            sector: match op {
                BlkOp::Read | BlkOp::Write => sector,
                _ => 0,
            },
        };
        let control = self.control.mem();
        control.write(base, &header.to_bytes())?;
        // The status byte starts as a value the device never writes, so a completion that
        // did not write it is caught.
        control.write(base + SLOT_STATUS, &[0xff])?;
        self.control
            .encode(base, REQ_HEADER_SIZE, usize::MAX, readable);
        let max_piece = self.geometry.max_piece;
        match op {
            BlkOp::Read | BlkOp::Write => {
                let b = buf.expect("checked: reads and writes have a buffer");
                let mut data = Vec::new();
                b.encode(0, b.len(), max_piece, &mut data);
                if data.len() > self.geometry.max_data_segments {
                    return Err(BlkError::TooLarge {
                        op,
                        len: b.len(),
                        max: (self.geometry.max_data_segments * PAGE_SIZE) as u64,
                    });
                }
                if op == BlkOp::Read {
                    writable.extend(data);
                } else {
                    readable.extend(data);
                }
            }
            BlkOp::Discard | BlkOp::WriteZeroes { .. } => {
                let flags = match op {
                    BlkOp::WriteZeroes { unmap: true } => WRITE_ZEROES_FLAG_UNMAP,
                    _ => 0,
                };
                let seg = DiscardWriteZeroes {
                    sector,
                    num_sectors: sectors,
                    flags,
                };
                control.write(base + SLOT_SEGMENT, &seg.to_bytes())?;
                self.control.encode(
                    base + SLOT_SEGMENT,
                    DISCARD_SEGMENT_SIZE,
                    usize::MAX,
                    readable,
                );
            }
            BlkOp::GetId => {
                control.fill(base + SLOT_ID, ID_BYTES, 0)?;
                self.control
                    .encode(base + SLOT_ID, ID_BYTES, usize::MAX, writable);
            }
            BlkOp::Flush => {}
        }
        self.control
            .encode(base + SLOT_STATUS, 1, usize::MAX, writable);
        Ok(())
    }

    /// Moves every used chain into `ready` (zero-copy) or `stash` (blocking callers); fails
    /// everything in flight if the device stopped.
    fn reap(&mut self) -> Result<(), BlkError> {
        loop {
            let popped = match self.vq.pop() {
                Ok(p) => p,
                Err(e) => {
                    // The backend broke the ring: the device cannot be trusted any more.
                    self.link
                        .mark_lost(format!("the backend broke the used ring: {e}"));
                    return Err(e.into());
                }
            };
            let Some((pending, used_len)) = popped else {
                break;
            };
            let c = self.complete(pending, used_len);
            self.deliver(c);
        }
        if let Some(reason) = self.link.lost() {
            for pending in self.vq.drain() {
                self.free_slots.push(pending.slot);
                let c = Completion {
                    id: pending.id,
                    op: pending.op,
                    result: Err(BlkError::Stopped {
                        reason: reason.clone(),
                    }),
                    latency: pending.started.elapsed(),
                    buf: pending.buf,
                    id_bytes: None,
                };
                self.deliver_pending(c, pending.waiter);
            }
        }
        Ok(())
    }

    fn deliver(&mut self, c: (Completion, bool)) {
        self.deliver_pending(c.0, c.1);
    }

    fn deliver_pending(&mut self, c: Completion, waiter: bool) {
        if waiter {
            if !self.abandoned.remove(&c.id) {
                self.stash.insert(c.id, c);
            }
        } else {
            self.ready.push(c);
        }
    }

    fn complete(&mut self, p: Pending, used_len: u32) -> (Completion, bool) {
        self.free_slots.push(p.slot);
        let base = Self::slot_offset(p.slot);
        let control = self.control.mem();
        let status = control
            .read_array::<1>(base + SLOT_STATUS)
            .map(|b| b[0])
            .unwrap_or(0xff);
        let mut id_bytes = None;
        let result = match status {
            S_OK => match p.op {
                BlkOp::Read | BlkOp::Write => Ok(p.buf.as_ref().map_or(0, DmaBuf::len)),
                BlkOp::GetId => {
                    let mut id = [0u8; ID_BYTES];
                    let n = (used_len as usize).saturating_sub(1).min(ID_BYTES);
                    if control.read(base + SLOT_ID, &mut id).is_ok() {
                        let len = id[..n].iter().position(|&b| b == 0).unwrap_or(n);
                        id_bytes = Some(id[..len].to_vec());
                    }
                    Ok(id_bytes.as_ref().map_or(0, Vec::len))
                }
                _ => Ok(0),
            },
            S_IOERR => Err(BlkError::Io {
                op: p.op,
                sector: p.sector,
            }),
            S_UNSUPP => Err(BlkError::Unsupported { op: p.op }),
            other => Err(BlkError::BadStatus {
                op: p.op,
                status: other,
            }),
        };
        if let Ok(n) = &result {
            self.geometry
                .bytes_done
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        self.geometry.requests_done.fetch_add(1, Ordering::Relaxed);
        (
            Completion {
                id: p.id,
                op: p.op,
                result,
                latency: p.started.elapsed(),
                buf: p.buf,
                id_bytes,
            },
            p.waiter,
        )
    }
}

struct QueueSlot<P: Platform> {
    queue: Mutex<BlkQueue<P>>,
    /// Signalled when the poller reaped completions.
    reaped: Condvar,
}

/// Counters of one blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests completed.
    pub requests: u64,
    /// Bytes read and written by completed requests.
    pub bytes: u64,
    /// Notifications.
    pub events: EventStats,
    /// DMA memory and grants.
    pub dma: DmaStats,
}

/// A connected virtio-blk device (see the module documentation).
pub struct BlkDevice<P: Platform> {
    queues: Vec<QueueSlot<P>>,
    geometry: Arc<Geometry>,
    next_queue: AtomicUsize,
    io_timeout: Option<Duration>,
    max_request: usize,
    closed: bool,
    transport: Transport<P>,
}

impl<P: Platform> std::fmt::Debug for BlkDevice<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("devid", &self.transport.ctx.devid)
            .field("queues", &self.queues.len())
            .field("strategy", &self.transport.negotiated.strategy)
            .finish()
    }
}

impl<P: Platform + Clone> Frontend<P> {
    /// Connects blk device `devid`.
    pub fn connect_blk(
        &self,
        devid: u32,
        options: &BlkOptions,
    ) -> Result<BlkDevice<P>, ConnectError> {
        let wanted = options.connect.num_queues.unwrap_or(u32::MAX);
        let (transport, parts) = self.connect_transport(
            devid,
            DeviceKind::Block,
            DRIVER_BITS,
            QueueCount::UpTo(wanted),
            &options.connect,
        )?;
        BlkDevice::new(transport, parts, options)
    }
}

impl<P: Platform> BlkDevice<P> {
    fn new(
        transport: Transport<P>,
        parts: Vec<crate::transport::QueueParts<P>>,
        options: &BlkOptions,
    ) -> Result<Self, ConnectError> {
        let Negotiated {
            driver_features,
            queue_size,
            ..
        } = transport.negotiated.clone();
        let config = BlkConfig::from_bytes(&transport.config().bytes);
        let has = |f| features::has(driver_features, f);
        let max_piece = if has(fb::SIZE_MAX) && config.size_max > 0 {
            config.size_max as usize
        } else {
            usize::MAX
        };
        // Header and status take two descriptors; an indirect table holds one page of them.
        let chain_room = if has(ft::RING_INDIRECT_DESC) {
            crate::queue::MAX_INDIRECT_ENTRIES
        } else {
            queue_size as usize
        };
        let mut max_data_segments = chain_room.saturating_sub(3).max(1);
        if has(fb::SEG_MAX) && config.seg_max > 0 {
            max_data_segments = max_data_segments.min(config.seg_max as usize);
        }
        let arena = transport.arena();
        let pages = (max_data_segments.min(MAX_REQUEST_PAGES))
            .min((arena.pages() / 4).max(1))
            .max(1);
        let max_request = pages * PAGE_SIZE;
        let geometry = Arc::new(Geometry {
            features: driver_features,
            read_only: has(fb::RO),
            config: Arc::clone(&transport.config),
            max_piece,
            max_data_segments,
            bytes_done: AtomicU64::new(0),
            requests_done: AtomicU64::new(0),
        });
        let depth = options.depth.clamp(1, queue_size) as u16;
        let mut queues = Vec::with_capacity(parts.len());
        for p in parts {
            let control = arena
                .alloc(usize::from(depth) * SLOT_SIZE)
                .map_err(|source| ConnectError::Dma {
                    devid: transport.ctx.devid,
                    source,
                })?;
            let vq = p.into_virtqueue(driver_features, Arc::clone(&arena));
            queues.push(QueueSlot {
                queue: Mutex::new(BlkQueue {
                    vq,
                    control,
                    free_slots: (0..depth).rev().collect(),
                    depth,
                    next_seq: 0,
                    ready: Vec::new(),
                    stash: HashMap::new(),
                    abandoned: HashSet::new(),
                    polling: false,
                    arena: Arc::clone(&arena),
                    geometry: Arc::clone(&geometry),
                    link: Arc::clone(&transport.link),
                }),
                reaped: Condvar::new(),
            });
        }
        tracing::debug!(
            devid = transport.ctx.devid,
            capacity = config.capacity,
            read_only = geometry.read_only,
            max_request,
            depth,
            "blk device ready"
        );
        Ok(Self {
            queues,
            geometry,
            next_queue: AtomicUsize::new(0),
            io_timeout: options.io_timeout,
            max_request,
            closed: false,
            transport,
        })
    }

    /// The device number.
    pub fn devid(&self) -> u32 {
        self.transport.ctx.devid
    }

    /// The backend domain.
    pub fn backend(&self) -> xenvirtio_xen::DomId {
        self.transport.ctx.backend
    }

    /// What the handshake settled (features, DMA strategy and why, queue size).
    pub fn negotiated(&self) -> &Negotiated {
        &self.transport.negotiated
    }

    /// The device's config space as last read (it follows `config-generation`).
    pub fn config(&self) -> BlkConfig {
        self.geometry.blk_config()
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.geometry.capacity_sectors().saturating_mul(SECTOR_SIZE)
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.geometry.read_only
    }

    /// Whether flush, discard and write-zeroes were negotiated.
    pub fn supports(&self, op: BlkOp) -> bool {
        match op {
            BlkOp::Flush => self.geometry.has(fb::FLUSH),
            BlkOp::Discard => self.geometry.has(fb::DISCARD),
            BlkOp::WriteZeroes { .. } => self.geometry.has(fb::WRITE_ZEROES),
            _ => true,
        }
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Largest request the blocking API makes (larger calls are split).
    pub fn max_request_bytes(&self) -> usize {
        self.max_request
    }

    /// Why the device stopped, if it did (the backend left Connected).
    pub fn stopped(&self) -> Option<String> {
        self.transport.link.lost()
    }

    /// A buffer of `len` bytes of the device's DMA memory, for zero-copy I/O.
    pub fn alloc(&self, len: usize) -> Result<DmaBuf, DmaError> {
        self.transport.dma().alloc(len)
    }

    /// Queue `index` for zero-copy I/O. Blocking calls that picked the same queue wait while
    /// the guard is held.
    pub fn lock_queue(&self, index: usize) -> MutexGuard<'_, BlkQueue<P>> {
        self.queues[index]
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counters.
    pub fn stats(&self) -> BlkStats {
        BlkStats {
            requests: self.geometry.requests_done.load(Ordering::Relaxed),
            bytes: self.geometry.bytes_done.load(Ordering::Relaxed),
            events: self.transport.event_stats(),
            dma: self.transport.dma_stats(),
        }
    }

    fn check_bytes(&self, offset: u64, len: usize) -> Result<(), BlkError> {
        let size = self.size();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(BlkError::OutOfRange {
                offset,
                len: len as u64,
                capacity: size,
            });
        }
        Ok(())
    }

    /// Reads `dst.len()` bytes at byte `offset` (any alignment), bouncing through DMA memory.
    pub fn read_at(&self, dst: &mut [u8], offset: u64) -> Result<(), BlkError> {
        self.check_bytes(offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        let start = offset - offset % SECTOR_SIZE;
        let end = (offset + dst.len() as u64).next_multiple_of(SECTOR_SIZE);
        let mut chunks = Vec::new();
        let mut at = start;
        while at < end {
            let len = ((end - at) as usize).min(self.max_request);
            chunks.push((at, len));
            at += len as u64;
        }
        self.run_staged(
            BlkOp::Read,
            &chunks,
            |_, _| Ok(()),
            |chunk_start, c| {
                let buf = c.buf.expect("reads return their buffer");
                // The part of [chunk_start, chunk_start + len) inside [offset, offset + dst.len()).
                let lo = chunk_start.max(offset);
                let hi = (chunk_start + buf.len() as u64).min(offset + dst.len() as u64);
                if lo < hi {
                    let d = &mut dst[(lo - offset) as usize..(hi - offset) as usize];
                    buf.bounce_out((lo - chunk_start) as usize, d)?;
                }
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Writes `src` at byte `offset` (any alignment; partial sectors are read, merged and
    /// written back, which is not atomic against a concurrent write of the same sector).
    pub fn write_at(&self, src: &[u8], offset: u64) -> Result<(), BlkError> {
        if self.read_only() {
            return Err(BlkError::ReadOnly);
        }
        self.check_bytes(offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let start = offset - offset % SECTOR_SIZE;
        let end = (offset + src.len() as u64).next_multiple_of(SECTOR_SIZE);
        // Partial first and last sectors: read them to merge.
        let mut head = [0u8; SECTOR_SIZE as usize];
        let mut tail = [0u8; SECTOR_SIZE as usize];
        let first_partial = offset % SECTOR_SIZE != 0 || (src.len() as u64) < SECTOR_SIZE;
        let last_partial = (offset + src.len() as u64) % SECTOR_SIZE != 0;
        if first_partial {
            self.read_at(&mut head, start)?;
        }
        if last_partial && end - SECTOR_SIZE != start {
            self.read_at(&mut tail, end - SECTOR_SIZE)?;
        } else if last_partial {
            tail = head;
        }
        let mut at = start;
        let mut chunks = Vec::new();
        while at < end {
            let len = ((end - at) as usize).min(self.max_request);
            chunks.push((at, len));
            at += len as u64;
        }
        self.run_staged(
            BlkOp::Write,
            &chunks,
            |at, buf| {
                let len = buf.len();
                // Sectors of this chunk that are only partly covered get the old bytes first.
                if at == start && first_partial {
                    buf.write(0, &head)?;
                }
                if at + len as u64 == end && last_partial {
                    buf.write(len - SECTOR_SIZE as usize, &tail)?;
                }
                let lo = at.max(offset);
                let hi = (at + len as u64).min(offset + src.len() as u64);
                buf.bounce_in(
                    (lo - at) as usize,
                    &src[(lo - offset) as usize..(hi - offset) as usize],
                )?;
                Ok(())
            },
            |_, _| Ok(()),
        )?;
        Ok(())
    }

    /// Flushes the device's write cache (a no-op without FLUSH: the device has none to flush,
    /// virtio 1.2 section 5.2.6.2).
    pub fn flush(&self) -> Result<(), BlkError> {
        if !self.supports(BlkOp::Flush) {
            return Ok(());
        }
        self.run(vec![(BlkOp::Flush, None, 0, 0)]).map(drop)
    }

    /// Discards the whole sectors inside `[offset, offset + len)` (discard is advisory, so
    /// partial sectors at the edges are left alone). A no-op without DISCARD.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlkError> {
        if self.read_only() {
            return Err(BlkError::ReadOnly);
        }
        self.check_bytes(offset, len as usize)?;
        if !self.supports(BlkOp::Discard) {
            return Ok(());
        }
        let first = offset.div_ceil(SECTOR_SIZE);
        let end = (offset + len) / SECTOR_SIZE;
        let max = u64::from(self.config().max_discard_sectors.max(1));
        self.ranges(BlkOp::Discard, first, end, max)
    }

    /// Zeroes `[offset, offset + len)`: whole sectors with WRITE_ZEROES when negotiated (or
    /// zero-filled writes otherwise), partial edges by read-modify-write.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlkError> {
        if self.read_only() {
            return Err(BlkError::ReadOnly);
        }
        self.check_bytes(offset, len as usize)?;
        let end_byte = offset + len;
        let first = offset.div_ceil(SECTOR_SIZE);
        let end = end_byte / SECTOR_SIZE;
        if first >= end {
            return self.write_at(&vec![0; len as usize], offset);
        }
        if offset < first * SECTOR_SIZE {
            self.write_at(&vec![0; (first * SECTOR_SIZE - offset) as usize], offset)?;
        }
        if end_byte > end * SECTOR_SIZE {
            self.write_at(
                &vec![0; (end_byte - end * SECTOR_SIZE) as usize],
                end * SECTOR_SIZE,
            )?;
        }
        if self.supports(BlkOp::WriteZeroes { unmap: false }) {
            let max = u64::from(self.config().max_write_zeroes_sectors.max(1));
            self.ranges(BlkOp::WriteZeroes { unmap: may_unmap }, first, end, max)
        } else {
            let zeroes = vec![0u8; self.max_request];
            let mut at = first * SECTOR_SIZE;
            while at < end * SECTOR_SIZE {
                let n = ((end * SECTOR_SIZE - at) as usize).min(zeroes.len());
                self.write_at(&zeroes[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
    }

    fn ranges(&self, op: BlkOp, first: u64, end: u64, max: u64) -> Result<(), BlkError> {
        let mut ops: Vec<(u64, u32)> = Vec::new();
        let mut s = first;
        while s < end {
            let n = (end - s).min(max).min(u64::from(u32::MAX));
            ops.push((s, n as u32));
            s += n;
        }
        for window in ops.chunks(BLOCKING_WINDOW) {
            self.run(window.iter().map(|&(s, n)| (op, None, s, n)).collect())?;
        }
        Ok(())
    }

    /// The device's id string (GET_ID), up to 20 bytes.
    pub fn get_id(&self) -> Result<Vec<u8>, BlkError> {
        let mut done = self.run(vec![(BlkOp::GetId, None, 0, 0)])?;
        Ok(done.pop().and_then(|c| c.id_bytes).unwrap_or_default())
    }

    fn staging(&self, len: usize) -> Result<DmaBuf, BlkError> {
        let timeout = self.io_timeout.unwrap_or(Duration::from_secs(3600));
        Ok(self.transport.dma().alloc_wait(len, timeout)?)
    }

    /// Runs one request of `op` per chunk `(byte offset, length)`, each with a staging buffer
    /// of the DMA memory that `prepare` fills before submission; `finish` gets each
    /// completion with its chunk's offset, in order. Requests go in windows of at most
    /// [`BLOCKING_WINDOW`], and a window also ends where the DMA memory is full: what it
    /// already holds is run first and gives its buffers back. (Allocating a whole window
    /// before running any of it waited for buffers this very call held, whenever the window
    /// needed more than the DMA memory: a 1 MiB write with 1 MiB of bounce pool hung until
    /// the I/O timeout on real Xen.)
    fn run_staged(
        &self,
        op: BlkOp,
        chunks: &[(u64, usize)],
        mut prepare: impl FnMut(u64, &DmaBuf) -> Result<(), BlkError>,
        mut finish: impl FnMut(u64, Completion) -> Result<(), BlkError>,
    ) -> Result<(), BlkError> {
        let mut ops: Vec<(BlkOp, Option<DmaBuf>, u64, u32)> = Vec::new();
        let mut starts: Vec<u64> = Vec::new();
        let mut run_window = |ops: &mut Vec<_>, starts: &mut Vec<u64>| -> Result<(), BlkError> {
            let done = self.run(std::mem::take(ops))?;
            for (c, at) in done.into_iter().zip(std::mem::take(starts)) {
                finish(at, c)?;
            }
            Ok(())
        };
        for &(at, len) in chunks {
            let buf = match self.transport.dma().alloc(len) {
                Ok(buf) => buf,
                Err(DmaError::Exhausted { .. }) => {
                    if !ops.is_empty() {
                        run_window(&mut ops, &mut starts)?;
                    }
                    // Other callers may hold the rest; wait for them.
                    self.staging(len)?
                }
                Err(e) => return Err(e.into()),
            };
            prepare(at, &buf)?;
            ops.push((op, Some(buf), at / SECTOR_SIZE, 0));
            starts.push(at);
            if ops.len() == BLOCKING_WINDOW {
                run_window(&mut ops, &mut starts)?;
            }
        }
        if !ops.is_empty() {
            run_window(&mut ops, &mut starts)?;
        }
        Ok(())
    }

    fn pick_queue(&self) -> &QueueSlot<P> {
        let i = self.next_queue.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        &self.queues[i]
    }

    /// Submits `ops` on one queue and waits for all of them (leader/follower: whichever
    /// caller finds nobody polling becomes the poller and reaps for everyone). Returns the
    /// completions in the order of `ops`, or the first error.
    fn run(
        &self,
        ops: Vec<(BlkOp, Option<DmaBuf>, u64, u32)>,
    ) -> Result<Vec<Completion>, BlkError> {
        let slot = self.pick_queue();
        let started = Instant::now();
        let deadline = self.io_timeout.map(|t| started + t);
        let op0 = ops.first().map_or(BlkOp::Flush, |o| o.0);
        let mut todo = ops.into_iter();
        let mut next = todo.next();
        let mut ids: Vec<RequestId> = Vec::new();
        let mut first_error: Option<BlkError> = None;
        let mut q = slot.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // Submit what fits; a busy queue (slots, ring or table memory) is retried after
            // completions.
            while let Some((op, buf, sector, sectors)) = next.take() {
                if first_error.is_some() {
                    break;
                }
                match q.submit(op, buf, sector, sectors, true) {
                    Ok(id) => {
                        ids.push(id);
                        next = todo.next();
                    }
                    Err(Rejected {
                        error: BlkError::QueueFull { .. },
                        buf,
                    }) => {
                        next = Some((op, buf, sector, sectors));
                        break;
                    }
                    Err(r) => first_error = Some(r.error),
                }
            }
            let all_done = ids.iter().all(|id| q.stash.contains_key(id));
            if all_done && (next.is_none() || first_error.is_some()) {
                let mut out = Vec::with_capacity(ids.len());
                for id in &ids {
                    let c = q.stash.remove(id).expect("checked: every id is done");
                    if first_error.is_none() {
                        if let Err(e) = &c.result {
                            first_error = Some(clone_error(e));
                        }
                    }
                    out.push(c);
                }
                drop(q);
                return match first_error {
                    Some(e) => Err(e),
                    None => Ok(out),
                };
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                // Leave the requests in flight (their buffers stay with the device) and forget
                // their completions when they come.
                for id in ids {
                    if q.stash.remove(&id).is_none() {
                        q.abandoned.insert(id);
                    }
                }
                return Err(BlkError::Timeout {
                    op: op0,
                    waited: started.elapsed(),
                });
            }
            if q.polling {
                let wait = left
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(1));
                q = slot
                    .reaped
                    .wait_timeout(q, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            // Become the poller.
            q.reap()?;
            if ids.iter().all(|id| q.stash.contains_key(id)) {
                slot.reaped.notify_all();
                continue;
            }
            let Some(seen) = q.vq.arm()? else {
                q.reap()?;
                slot.reaped.notify_all();
                continue;
            };
            q.polling = true;
            let events = Arc::clone(q.vq.events());
            drop(q);
            let waited = events.wait(
                seen,
                Some(
                    left.unwrap_or(Duration::from_secs(1))
                        .min(Duration::from_secs(1)),
                ),
            );
            q = slot.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.polling = false;
            let reaped =
                q.vq.disable_callbacks()
                    .map_err(BlkError::from)
                    .and_then(|()| q.reap());
            slot.reaped.notify_all();
            match waited {
                Ok(Wake::Event | Wake::Woken | Wake::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
            reaped?;
        }
    }

    /// Closes the device: Closing, wait for the backend's Closed, revoke, Closed.
    pub fn close(mut self) -> Result<(), ConnectError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ConnectError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let queues = std::mem::take(&mut self.queues);
        self.transport.teardown(queues)
    }
}

impl<P: Platform> Drop for BlkDevice<P> {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "closing the blk device failed");
        }
    }
}

/// A copy of an error for the blocking API, which reports the first failure of several
/// requests (errors hold no resources, so the copy is exact in meaning).
fn clone_error(e: &BlkError) -> BlkError {
    match e {
        BlkError::Io { op, sector } => BlkError::Io {
            op: *op,
            sector: *sector,
        },
        BlkError::Unsupported { op } => BlkError::Unsupported { op: *op },
        BlkError::BadStatus { op, status } => BlkError::BadStatus {
            op: *op,
            status: *status,
        },
        BlkError::Stopped { reason } => BlkError::Stopped {
            reason: reason.clone(),
        },
        other => BlkError::Stopped {
            reason: other.to_string(),
        },
    }
}

pub(crate) fn io_error(e: BlkError) -> std::io::Error {
    let errno = match &e {
        BlkError::ReadOnly => libc::EROFS,
        BlkError::OutOfRange { .. } | BlkError::Unaligned { .. } => libc::EINVAL,
        BlkError::Stopped { .. } => libc::ESHUTDOWN,
        BlkError::Unsupported { .. } | BlkError::NotNegotiated { .. } => libc::EOPNOTSUPP,
        _ => libc::EIO,
    };
    tracing::debug!(error = %e, errno, "blk request failed");
    std::io::Error::from_raw_os_error(errno)
}

/// A connected blk device is what the NBD server exports.
impl<P: Platform> crate::nbd::BlockExport for BlkDevice<P> {
    fn size(&self) -> u64 {
        BlkDevice::size(self)
    }

    fn read_only(&self) -> bool {
        BlkDevice::read_only(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        BlkDevice::read_at(self, buf, offset).map_err(io_error)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        BlkDevice::write_at(self, buf, offset).map_err(io_error)
    }

    fn can_flush(&self) -> bool {
        self.supports(BlkOp::Flush)
    }

    fn flush(&self) -> std::io::Result<()> {
        BlkDevice::flush(self).map_err(io_error)
    }

    /// Every connection's requests go to this one device, with no cache of their own on this
    /// side, and a flush is the device's `VIRTIO_BLK_T_FLUSH`, which the backend makes an
    /// fsync of the whole image: what one connection completed, another reads, and a flush on
    /// any connection makes it durable (the NBD spec's condition for `CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn can_trim(&self) -> bool {
        self.supports(BlkOp::Discard)
    }

    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.discard(offset, len).map_err(io_error)
    }

    fn can_write_zeroes(&self) -> bool {
        true
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        BlkDevice::write_zeroes(self, offset, len, may_trim).map_err(io_error)
    }
}
