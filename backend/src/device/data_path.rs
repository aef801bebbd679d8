//! The data path of a connected device: draining one queue (pop, map, serve, return the
//! chain, notify) within a budget, and moving console input into held receive buffers.
//! It never changes the device's phase: an error is returned to the state machine.

use mio::Registry;
use xenvirtio_virtio::console::{RECEIVEQ, TRANSMITQ};
use xenvirtio_xen::platform::Platform;

use super::model::{Connection, DeviceError, Model, Totals};
use crate::chain_io::ChainWriter;
use crate::console::ConsoleDevice;
use crate::dma::DmaMapError;

/// Chains served from one queue before the thread looks at its messages again.
pub const QUEUE_BUDGET: usize = 256;
/// Bytes of console input moved to the guest per receive buffer at most.
const CONSOLE_CHUNK: usize = 4096;

/// Drains one queue (up to [`QUEUE_BUDGET`] chains), notifying the frontend as it asks.
pub(super) fn serve_queue<P: Platform>(
    conn: &mut Connection<P>,
    q: usize,
    model: &mut Model,
    registry: &Registry,
    totals: &mut Totals,
) -> Result<(), DeviceError> {
    let qerr = |source| DeviceError::Queue { queue: q, source };
    let dma = |source| DeviceError::Dma { queue: q, source };
    let Connection {
        queues,
        space,
        counters,
        held_rx,
        ..
    } = conn;
    let qr = &mut queues[q];
    let ring = qr.ring.mem();
    let mut served = 0usize;
    loop {
        qr.queue.disable_notification(&ring).map_err(qerr)?;
        loop {
            if served >= QUEUE_BUDGET {
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
                Model::Console(_) if q == usize::from(RECEIVEQ) => {
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
                    let mapped = space.map_chain(&chain, counters).map_err(dma)?;
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
                Model::Blk(b) => {
                    let mapped = space.map_chain(&chain, counters).map_err(dma)?;
                    let used = b
                        .handle(&mapped.readable(), &mapped.writable())
                        .map_err(|source| DeviceError::Blk { queue: q, source })?;
                    drop(mapped);
                    used
                }
                Model::Rng(r) => {
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
            let mapped = space
                .map_chain(&chain, counters)
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
    if delivered
        && qr
            .queue
            .needs_notification(&ring)
            .map_err(|source| DeviceError::Queue { queue: q, source })?
    {
        qr.port.notify().map_err(DeviceError::Event)?;
        totals.notifications_sent += 1;
    }
    Ok(())
}
