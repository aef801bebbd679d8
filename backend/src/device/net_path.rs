//! The net device's part of the data path: a transmit chain checked by its lengths before it is
//! mapped, then handed to the host side; frames from the host side moved into held receive
//! chains, one frame per chain, mapping only the bytes written. A dropped frame is counted by
//! the device model ([`crate::net`]) and its chain returned with nothing written: it never ends
//! the connection.

use xenvirtio_virtio::device_queue::Chain;
use xenvirtio_virtio::net::RECEIVEQ;
use xenvirtio_xen::platform::Platform;

use super::data_path::{clipped, notify_if_asked};
use super::model::{Connection, DeviceError, Totals};
use crate::budget::Budgeted;
use crate::dma::{AddressSpace, DmaMapError, MapCounters};
use crate::net::NetDevice;

/// Serves one transmit chain: refused unmapped when its lengths break a rule, else mapped and
/// its frame handed on (or dropped and counted). The chain is returned with 0 bytes written.
pub(super) fn transmit<P: Platform>(
    dev: &mut NetDevice,
    chain: &Chain,
    space: &mut AddressSpace<Budgeted<P::GrantMap>, Budgeted<P::Foreign>>,
    counters: &mut MapCounters,
) -> Result<(), DmaMapError> {
    if dev
        .check_tx(chain.readable_len(), chain.writable_len())
        .is_err()
    {
        return Ok(());
    }
    let mapped = space.map_chain(chain, counters)?;
    // A drop is counted by the device; the chain is returned either way.
    let _ = dev.transmit(&mapped.readable());
    Ok(())
}

/// Moves frames from the host side into held receive chains until either runs out.
pub(super) fn deliver_net_input<P: Platform>(
    conn: &mut Connection<P>,
    dev: &mut NetDevice,
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
    let qerr = |source| DeviceError::Queue { queue: q, source };
    let mut delivered = false;
    while !held_rx.is_empty() {
        let n = match dev.next_frame() {
            Ok(Some(n)) => n,
            Ok(None) => break,
            Err(source) => {
                return Err(DeviceError::Io {
                    queue: q,
                    what: "reading a frame from the host side",
                    source,
                });
            }
        };
        let chain = held_rx.pop_front().expect("checked non-empty above");
        let used = if (chain.writable_len() as usize) < n {
            // Too small for the frame: returned empty, the frame dropped and counted.
            dev.drop_pending();
            0
        } else {
            // Only the bytes written are mapped.
            let mapped = space
                .map_chain(&clipped(&chain, true, n as u64), counters)
                .map_err(|source| DeviceError::Dma { queue: q, source })?;
            dev.deliver(&mapped.writable())
                .map_err(|source| DeviceError::Io {
                    queue: q,
                    what: "writing a frame into a receive buffer",
                    source,
                })?
        };
        qr.queue.add_used(&ring, chain.head, used).map_err(qerr)?;
        totals.requests += 1;
        delivered = true;
    }
    if delivered {
        notify_if_asked(&mut qr.queue, &qr.port, &ring, q, totals)?;
    }
    Ok(())
}
