//! The data path of a connected device: draining one queue (pop, map, serve, return the
//! chain, notify) within a budget, and moving console input into held receive buffers (net's
//! frames: `net_path`).
//! It never changes the device's phase: an error is returned to the state machine.
//!
//! **Bounds against a hostile guest** (`docs/RELIABILITY.md`, "Resource bounds"). A chain's
//! length is checked against the per-request cap of its device *before* anything is mapped or
//! copied, so a request over the cap costs no more than the cap: blk answers it `IOERR` after
//! mapping only its status byte, console transmit writes the first [`CONSOLE_TX_MAX`] bytes and
//! drops the rest, console receive fills at most [`CONSOLE_CHUNK`] bytes of a buffer. A serve
//! call stops after [`QUEUE_BUDGET`] chains per queue, [`BYTE_BUDGET`] bytes or [`TIME_BUDGET`]
//! over all queues, whichever comes first, so the thread looks at its inbox (DomainGone,
//! shutdown) at least that often.

use std::time::{Duration, Instant};

use mio::Registry;
use xenvirtio_virtio::blk::{REQ_HEADER_SIZE, S_IOERR};
use xenvirtio_virtio::console::{RECEIVEQ, TRANSMITQ};
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_xen::mem::SharedMem;
use xenvirtio_xen::platform::{BoundPort, EventChannels, Platform};

use super::model::{Connection, DeviceError, Model, Totals};
use crate::blk::BlkChainError;
use crate::chain_io::ChainWriter;
use crate::console::ConsoleDevice;
use crate::dma::DmaMapError;
use xenvirtio_virtio::device_queue::{Chain, ChainDescriptor, DeviceQueue};

/// Chains served from one queue before the thread looks at its messages again.
pub const QUEUE_BUDGET: usize = 256;
/// Bytes of console input moved to the guest per receive buffer at most.
pub const CONSOLE_CHUNK: usize = 4096;
/// Bytes of one console transmit request written to the host side at most; the rest of a
/// longer chain is dropped (and counted in `oversized`), without being mapped.
pub const CONSOLE_TX_MAX: u32 = 64 * 1024;
/// Chain bytes served by one serve call, over all queues, before the inbox is looked at.
pub const BYTE_BUDGET: u64 = 64 * 1024 * 1024;
/// Time spent by one serve call, over all queues, before the inbox is looked at.
pub const TIME_BUDGET: Duration = Duration::from_millis(50);

/// The largest blk request the device offers: `size_max × seg_max` data bytes plus the header
/// and the status byte (virtio 1.2 section 5.2.4: `size_max`, `seg_max`).
pub(super) fn blk_request_cap(size_max: u32, seg_max: u32) -> u64 {
    u64::from(size_max) * u64::from(seg_max) + REQ_HEADER_SIZE as u64 + 1
}

/// What one serve call may still spend before the thread looks at its inbox.
#[derive(Debug)]
pub(super) struct Budget {
    bytes_left: u64,
    deadline: Instant,
    /// The per-request cap of a blk device, in chain bytes.
    pub blk_cap: u64,
}

impl Budget {
    /// A fresh budget for one serve call.
    pub(super) fn new(blk_cap: u64) -> Self {
        Budget {
            bytes_left: BYTE_BUDGET,
            deadline: Instant::now() + TIME_BUDGET,
            blk_cap,
        }
    }

    fn spend(&mut self, bytes: u64) {
        self.bytes_left = self.bytes_left.saturating_sub(bytes);
    }

    /// Spent: bytes gone or time up.
    pub(super) fn exhausted(&self) -> bool {
        self.bytes_left == 0 || Instant::now() >= self.deadline
    }
}

/// The first `max` bytes of a chain's buffers of one direction (readable or writable): a
/// chain of descriptors that name only those bytes, so mapping it maps no more.
pub(super) fn clipped(chain: &Chain, writable: bool, max: u64) -> Chain {
    let mut left = max;
    let mut descriptors = Vec::new();
    for d in chain.descriptors.iter().filter(|d| d.writable == writable) {
        if left == 0 {
            break;
        }
        let len = u64::from(d.len).min(left);
        left -= len;
        descriptors.push(ChainDescriptor {
            len: len as u32, // `len <= d.len`, a u32.
            ..*d
        });
    }
    Chain {
        head: chain.head,
        descriptors,
    }
}

/// A chain naming only the last byte of `chain`'s last non-empty writable buffer: the status
/// byte of a blk request, the only byte an oversized request may cost. A buffer whose range
/// breaks the strategy's rule (section 4) is named whole, so that mapping it is refused as
/// it would have been.
fn status_byte(chain: &Chain, strategy: DmaStrategy) -> Option<Chain> {
    let last = chain.writable().filter(|d| d.len > 0).last()?;
    let valid = DmaAddr::decode_range(strategy, last.addr, last.len, u64::MAX).is_ok();
    let desc = if valid {
        // Inside one page (grant), the pool (bounce) or the address space (direct): the
        // last byte's address is the first's plus `len - 1`, without a carry into the tag.
        ChainDescriptor {
            addr: last.addr + u64::from(last.len - 1),
            len: 1,
            writable: true,
        }
    } else {
        *last
    };
    Some(Chain {
        head: chain.head,
        descriptors: vec![desc],
    })
}

/// Drains one queue (up to [`QUEUE_BUDGET`] chains, within `budget`), notifying the frontend
/// as it asks.
pub(super) fn serve_queue<P: Platform>(
    conn: &mut Connection<P>,
    q: usize,
    model: &mut Model,
    registry: &Registry,
    totals: &mut Totals,
    budget: &mut Budget,
) -> Result<(), DeviceError> {
    let qerr = |source| DeviceError::Queue { queue: q, source };
    let dma = |source| DeviceError::Dma { queue: q, source };
    let Connection {
        queues,
        space,
        counters,
        held_rx,
        strategy,
        ..
    } = conn;
    let strategy = *strategy;
    let qr = &mut queues[q];
    let ring = qr.ring.mem();
    let mut served = 0usize;
    loop {
        qr.queue.disable_notification(&ring).map_err(qerr)?;
        loop {
            if served >= QUEUE_BUDGET || budget.exhausted() {
                // Come back after a look at the messages; notifications stay disabled.
                qr.busy = true;
                break;
            }
            let chain = qr
                .queue
                .pop_chain(&ring, &mut |addr, len| space.read(addr, len, counters))
                .map_err(qerr)?;
            let Some(chain) = chain else { break };
            served += 1;
            let used = match model {
                Model::Console(_) | Model::Net(_) if q == usize::from(RECEIVEQ) => {
                    // Held until input arrives. A driver cannot have more chains outstanding
                    // than the queue holds; one that offers the same heads again would make
                    // this list grow without bound.
                    if held_rx.len() >= usize::from(qr.queue.layout().size()) {
                        return Err(DeviceError::TooManyHeld {
                            queue: q,
                            size: qr.queue.layout().size(),
                        });
                    }
                    held_rx.push_back(chain);
                    continue;
                }
                Model::Console(c) if q == usize::from(TRANSMITQ) => {
                    let len = chain.readable_len();
                    if len > CONSOLE_TX_MAX {
                        totals.oversized += 1;
                    }
                    let take = len.min(CONSOLE_TX_MAX);
                    budget.spend(u64::from(take));
                    let clip = clipped(&chain, false, u64::from(take));
                    let mapped = space.map_chain(&clip, counters).map_err(dma)?;
                    let mut buf = [0u8; CONSOLE_CHUNK];
                    for w in mapped.readable() {
                        let mut at = 0;
                        while at < w.len() {
                            let n = (w.len() - at).min(buf.len());
                            w.read(at, &mut buf[..n])
                                .map_err(|e| dma(DmaMapError::Mem(e)))?;
                            c.write_output(registry, &buf[..n]);
                            at += n;
                        }
                    }
                    drop(mapped);
                    0
                }
                Model::Console(_) => 0,
                Model::Net(n) => {
                    budget.spend(u64::from(chain.readable_len()));
                    super::net_path::transmit::<P>(n, &chain, space, counters).map_err(dma)?;
                    0
                }
                Model::Blk(_)
                    if u64::from(chain.readable_len()) + u64::from(chain.writable_len())
                        > budget.blk_cap =>
                {
                    // Over what the device offers: answered IOERR, and only the status byte
                    // is mapped (`docs/PROTOCOL.md` 10.2).
                    totals.oversized += 1;
                    budget.spend(1);
                    let status = status_byte(&chain, strategy).ok_or(DeviceError::Blk {
                        queue: q,
                        source: BlkChainError::NoStatus,
                    })?;
                    let mapped = space.map_chain(&status, counters).map_err(dma)?;
                    let windows = mapped.writable();
                    ChainWriter::new(&windows)
                        .write_all(&[S_IOERR])
                        .map_err(|e| DeviceError::Io {
                            queue: q,
                            what: "writing the status of an oversized request",
                            source: std::io::Error::other(e.to_string()),
                        })?;
                    drop(mapped);
                    1
                }
                Model::Blk(b) => {
                    budget.spend(u64::from(chain.readable_len()) + u64::from(chain.writable_len()));
                    let mapped = space.map_chain(&chain, counters).map_err(dma)?;
                    let used = b
                        .handle(&mapped.readable(), &mapped.writable())
                        .map_err(|source| DeviceError::Blk { queue: q, source })?;
                    drop(mapped);
                    used
                }
                Model::Rng(r) => {
                    budget.spend(u64::from(chain.writable_len()));
                    let mapped = space.map_chain(&chain, counters).map_err(dma)?;
                    let used = r
                        .handle(&mapped.writable())
                        .map_err(|source| DeviceError::Io {
                            queue: q,
                            what: "getrandom failed",
                            source,
                        })?;
                    drop(mapped);
                    used
                }
            };
            // The request's own mappings are gone: only now is the chain returned.
            qr.queue.add_used(&ring, chain.head, used).map_err(qerr)?;
            totals.requests += 1;
        }
        if qr.queue.needs_notification(&ring).map_err(qerr)? {
            qr.port.notify().map_err(DeviceError::Event)?;
            totals.notifications_sent += 1;
        }
        if qr.busy || !qr.queue.enable_notification(&ring).map_err(qerr)? {
            return Ok(());
        }
    }
}

/// Moves console input into held receive buffers, one buffer per read.
pub(super) fn deliver_console_input<P: Platform>(
    conn: &mut Connection<P>,
    console: &mut ConsoleDevice,
    registry: &Registry,
    totals: &mut Totals,
) -> Result<(), DeviceError> {
    let q = usize::from(RECEIVEQ);
    let Connection {
        queues,
        space,
        counters,
        held_rx,
        ..
    } = conn;
    let Some(qr) = queues.get_mut(q) else {
        return Ok(());
    };
    let ring = qr.ring.mem();
    let mut delivered = false;
    let mut buf = [0u8; CONSOLE_CHUNK];
    while console.input_ready() {
        let Some(chain) = held_rx.front() else { break };
        let room = (chain.writable_len() as usize).min(CONSOLE_CHUNK);
        let n = if room == 0 {
            0
        } else {
            let n = console.read_input(registry, &mut buf[..room]);
            if n == 0 {
                break;
            }
            n
        };
        let chain = held_rx.pop_front().expect("checked non-empty above");
        if n > 0 {
            // Only the bytes written are mapped (`n <= CONSOLE_CHUNK`).
            let mapped = space
                .map_chain(&clipped(&chain, true, n as u64), counters)
                .map_err(|source| DeviceError::Dma { queue: q, source })?;
            let windows = mapped.writable();
            ChainWriter::new(&windows)
                .write_all(&buf[..n])
                .map_err(|e| DeviceError::Io {
                    queue: q,
                    what: "writing console input",
                    source: std::io::Error::other(e.to_string()),
                })?;
        }
        // `n <= CONSOLE_CHUNK`.
        qr.queue
            .add_used(&ring, chain.head, n as u32)
            .map_err(|source| DeviceError::Queue { queue: q, source })?;
        totals.requests += 1;
        delivered = true;
    }
    if delivered {
        notify_if_asked(&mut qr.queue, &qr.port, &ring, q, totals)?;
    }
    Ok(())
}

/// After chains were returned outside a drain of their queue (held receive chains filled):
/// notifies the frontend if its ring asks for it.
pub(super) fn notify_if_asked<E: EventChannels>(
    queue: &mut DeviceQueue,
    port: &BoundPort<E>,
    ring: &SharedMem<'_>,
    q: usize,
    totals: &mut Totals,
) -> Result<(), DeviceError> {
    if queue
        .needs_notification(ring)
        .map_err(|source| DeviceError::Queue { queue: q, source })?
    {
        port.notify().map_err(DeviceError::Event)?;
        totals.notifications_sent += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(addr: u64, len: u32, writable: bool) -> ChainDescriptor {
        ChainDescriptor {
            addr,
            len,
            writable,
        }
    }

    #[test]
    fn the_blk_cap_is_what_the_device_offers_plus_header_and_status() {
        // `max-queue-size` 1024: seg_max 1022.
        assert_eq!(blk_request_cap(65536, 1022), 1022 * 65536 + 17);
        assert_eq!(
            blk_request_cap(u32::MAX, u32::MAX),
            u64::from(u32::MAX).pow(2) + 17
        );
    }

    #[test]
    fn clipping_names_only_the_first_bytes_of_one_direction() {
        let chain = Chain {
            head: 3,
            descriptors: vec![d(0, 10, false), d(100, 20, false), d(500, 8, true)],
        };
        let c = clipped(&chain, false, 15);
        assert_eq!(c.head, 3);
        assert_eq!(c.descriptors, vec![d(0, 10, false), d(100, 5, false)]);
        assert_eq!(
            clipped(&chain, true, 4096).descriptors,
            vec![d(500, 8, true)]
        );
        assert!(clipped(&chain, false, 0).descriptors.is_empty());
    }

    #[test]
    fn the_status_byte_is_the_last_byte_of_the_last_writable_buffer() {
        let chain = Chain {
            head: 1,
            descriptors: vec![d(0, 16, false), d(4096, 512, true), d(9000, 2, true)],
        };
        assert_eq!(
            status_byte(&chain, DmaStrategy::Direct)
                .unwrap()
                .descriptors,
            vec![d(9001, 1, true)]
        );
        // A grant buffer that crosses its page is named whole (and refused when mapped), never
        // by an address whose offset carried into the grant reference.
        let g = DmaAddr::Grant {
            gref: 7,
            offset: 4000,
        }
        .encode();
        let crossing = Chain {
            head: 2,
            descriptors: vec![d(g, 200, true)],
        };
        assert_eq!(
            status_byte(&crossing, DmaStrategy::Grant)
                .unwrap()
                .descriptors,
            vec![d(g, 200, true)]
        );
        let inside = Chain {
            head: 2,
            descriptors: vec![d(g, 96, true)],
        };
        assert_eq!(
            status_byte(&inside, DmaStrategy::Grant)
                .unwrap()
                .descriptors,
            vec![d(g + 95, 1, true)]
        );
        let none = Chain {
            head: 1,
            descriptors: vec![d(0, 16, false)],
        };
        assert!(status_byte(&none, DmaStrategy::Bounce).is_none());
    }

    #[test]
    fn a_budget_is_spent_by_bytes() {
        let mut b = Budget::new(0);
        assert!(!b.exhausted());
        b.spend(BYTE_BUDGET - 1);
        assert!(!b.exhausted());
        b.spend(2);
        assert!(b.exhausted());
    }
}
