//! The virtio-rng driver (virtio 1.2 section 5.4): random bytes from the backend.
//!
//! One queue; each request is one device-writable buffer of DMA memory that the backend fills.
//! The bytes are copied out to the caller (and counted as bounced). This module never hands
//! out bytes the backend did not say it wrote.

use std::time::Duration;

use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::platform::Platform;

use crate::dma::{DmaBuf, DmaStats};
use crate::queue::{DriverError, EventStats, Virtqueue};
use crate::transport::{ConnectError, ConnectOptions, Frontend, Negotiated, QueueCount, Transport};

/// Largest request: 16 KiB.
const MAX_REQUEST: usize = 16 * 1024;

/// A connected virtio-rng device.
pub struct RngDevice<P: Platform> {
    queue: Option<Virtqueue<P::Events, DmaBuf>>,
    transport: Transport<P>,
}

impl<P: Platform> std::fmt::Debug for RngDevice<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RngDevice")
            .field("devid", &self.transport.ctx.devid)
            .finish()
    }
}

impl<P: Platform + Clone> Frontend<P> {
    /// Connects rng device `devid`.
    pub fn connect_rng(
        &self,
        devid: u32,
        options: &ConnectOptions,
    ) -> Result<RngDevice<P>, ConnectError> {
        let (transport, mut parts) =
            self.connect_transport(devid, DeviceKind::Rng, 0, QueueCount::Exactly(1), options)?;
        let features = transport.negotiated.driver_features;
        let queue = parts
            .pop()
            .map(|p| p.into_virtqueue(features, transport.arena()));
        Ok(RngDevice { queue, transport })
    }
}

impl<P: Platform> RngDevice<P> {
    /// What the handshake settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.transport.negotiated
    }

    /// Fills `dst` with random bytes from the device, waiting up to `timeout` for each
    /// request. Returns the number of bytes filled (less than `dst.len()` only on timeout).
    pub fn read(
        &mut self,
        dst: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, DriverError> {
        let link = std::sync::Arc::clone(&self.transport.link);
        let dma = self.transport.dma();
        let queue = self.queue.as_mut().expect("the queue lives until close");
        let mut filled = 0;
        while filled < dst.len() {
            let want = (dst.len() - filled).min(MAX_REQUEST);
            let buf = dma.alloc(want)?;
            let mut segs = Vec::new();
            buf.encode(0, want, usize::MAX, &mut segs);
            queue.add_simple(&[], &segs, buf)?;
            queue.kick()?;
            let Some((buf, len)) = queue.wait_pop(&link, timeout)? else {
                break;
            };
            let n = (len as usize).min(want);
            buf.bounce_out(0, &mut dst[filled..filled + n])?;
            filled += n;
        }
        Ok(filled)
    }

    /// Notification counters.
    pub fn event_stats(&self) -> EventStats {
        self.transport.event_stats()
    }

    /// DMA counters.
    pub fn dma_stats(&self) -> DmaStats {
        self.transport.dma_stats()
    }

    /// Closes the device (Closing, wait for the backend's Closed, revoke, Closed).
    pub fn close(mut self) -> Result<(), ConnectError> {
        let q = self.queue.take();
        self.transport.teardown(q)
    }
}

impl<P: Platform> Drop for RngDevice<P> {
    fn drop(&mut self) {
        if let Some(q) = self.queue.take() {
            if let Err(e) = self.transport.teardown(q) {
                tracing::warn!(error = %e, "closing the rng device failed");
            }
        }
    }
}
