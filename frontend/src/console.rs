//! The virtio-console driver (virtio 1.2 section 5.3), port 0 only.
//!
//! Queue 0 (receiveq) always has a few device-writable buffers posted for the backend to fill
//! with what port 0 sends; queue 1 (transmitq) carries what the caller writes. The two halves
//! are separate objects ([`ConsoleRx`], [`ConsoleTx`]) with separate queues and event
//! channels, so one thread can read while another writes. `MULTIPORT` is never accepted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::mem::PAGE_SIZE;
use xenvirtio_xen::platform::Platform;

use crate::dma::{Arena, DmaBuf};
use crate::queue::{DriverError, Virtqueue};
use crate::transport::{
    ConnectError, ConnectOptions, Frontend, Link, Negotiated, QueueCount, Transport,
};

/// Receive buffers kept posted.
const RX_BUFFERS: usize = 4;
/// Size of each receive buffer, and the largest write in one request.
const CHUNK: usize = PAGE_SIZE;

/// The receiving half: what port 0 sends to the driver.
pub struct ConsoleRx<P: Platform> {
    queue: Virtqueue<P::Events, DmaBuf>,
    arena: Arc<Arena>,
    link: Arc<Link>,
    leftover: VecDeque<u8>,
}

/// The transmitting half: what the driver sends to port 0.
pub struct ConsoleTx<P: Platform> {
    queue: Virtqueue<P::Events, DmaBuf>,
    arena: Arc<Arena>,
    link: Arc<Link>,
}

impl<P: Platform> std::fmt::Debug for ConsoleRx<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleRx")
            .field("buffered", &self.leftover.len())
            .finish()
    }
}

impl<P: Platform> std::fmt::Debug for ConsoleTx<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleTx").finish()
    }
}

/// A connected virtio-console device.
pub struct ConsoleDevice<P: Platform> {
    rx: Option<Mutex<ConsoleRx<P>>>,
    tx: Option<Mutex<ConsoleTx<P>>>,
    transport: Transport<P>,
}

impl<P: Platform> std::fmt::Debug for ConsoleDevice<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleDevice")
            .field("devid", &self.transport.ctx.devid)
            .finish()
    }
}

impl<P: Platform + Clone> Frontend<P> {
    /// Connects console device `devid` (port 0).
    pub fn connect_console(
        &self,
        devid: u32,
        options: &ConnectOptions,
    ) -> Result<ConsoleDevice<P>, ConnectError> {
        let (transport, parts) = self.connect_transport(
            devid,
            DeviceKind::Console,
            0,
            QueueCount::Exactly(2),
            options,
        )?;
        let features = transport.negotiated.driver_features;
        let arena = transport.arena();
        let mut queues = parts
            .into_iter()
            .map(|p| p.into_virtqueue::<DmaBuf>(features, Arc::clone(&arena)));
        let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
            unreachable!("the transport set up exactly two queues");
        };
        let mut rx = ConsoleRx {
            queue: rxq,
            arena: Arc::clone(&arena),
            link: Arc::clone(&transport.link),
            leftover: VecDeque::new(),
        };
        let devid_ = devid;
        for _ in 0..RX_BUFFERS {
            if let Err(e) = rx.post() {
                tracing::warn!(devid = devid_, error = %e, "posting a console receive buffer failed");
            }
        }
        let tx = ConsoleTx {
            queue: txq,
            arena,
            link: Arc::clone(&transport.link),
        };
        Ok(ConsoleDevice {
            rx: Some(Mutex::new(rx)),
            tx: Some(Mutex::new(tx)),
            transport,
        })
    }
}

impl<P: Platform> ConsoleRx<P> {
    fn post(&mut self) -> Result<(), DriverError> {
        let buf = self.arena.alloc(CHUNK)?;
        let mut segs = Vec::new();
        buf.encode(0, CHUNK, usize::MAX, &mut segs);
        self.queue.add_simple(&[], &segs, buf)?;
        self.queue.kick()?;
        Ok(())
    }

    /// Reads what port 0 sent, waiting up to `timeout` (forever with `None`) for something.
    /// Returns 0 on timeout.
    pub fn read(
        &mut self,
        dst: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<usize, DriverError> {
        if self.leftover.is_empty() {
            let Some((buf, len)) = self.queue.wait_pop(&self.link, timeout)? else {
                return Ok(0);
            };
            let n = (len as usize).min(buf.len());
            let mut data = vec![0u8; n];
            buf.bounce_out(0, &mut data)?;
            self.leftover.extend(data);
            drop(buf);
            self.post()?;
        }
        let n = dst.len().min(self.leftover.len());
        for (d, s) in dst.iter_mut().zip(self.leftover.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

impl<P: Platform> ConsoleTx<P> {
    /// Sends `data` to port 0, waiting for the backend to take each chunk.
    pub fn write(&mut self, data: &[u8], timeout: Option<Duration>) -> Result<(), DriverError> {
        for chunk in data.chunks(CHUNK) {
            let buf = self.arena.alloc(chunk.len())?;
            buf.bounce_in(0, chunk)?;
            let mut segs = Vec::new();
            buf.encode(0, chunk.len(), usize::MAX, &mut segs);
            self.queue.add_simple(&segs, &[], buf)?;
            self.queue.kick()?;
            if self.queue.wait_pop(&self.link, timeout)?.is_none() {
                return Err(DriverError::Stopped {
                    reason: "the backend did not take console output in time".into(),
                });
            }
        }
        Ok(())
    }
}

impl<P: Platform> ConsoleDevice<P> {
    /// What the handshake settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.transport.negotiated
    }

    /// The receiving half (lock it from the reading thread).
    pub fn rx(&self) -> &Mutex<ConsoleRx<P>> {
        self.rx.as_ref().expect("the halves live until close")
    }

    /// The transmitting half (lock it from the writing thread).
    pub fn tx(&self) -> &Mutex<ConsoleTx<P>> {
        self.tx.as_ref().expect("the halves live until close")
    }

    /// Sends `data` to port 0.
    pub fn write(&self, data: &[u8]) -> Result<(), DriverError> {
        self.tx()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(data, Some(Duration::from_secs(30)))
    }

    /// Why the device stopped, if it did.
    pub fn stopped(&self) -> Option<String> {
        self.transport.link.lost()
    }

    /// Closes the device (Closing, wait for the backend's Closed, revoke, Closed).
    pub fn close(mut self) -> Result<(), ConnectError> {
        let halves = (self.rx.take(), self.tx.take());
        self.transport.teardown(halves)
    }
}

impl<P: Platform> Drop for ConsoleDevice<P> {
    fn drop(&mut self) {
        if self.rx.is_some() || self.tx.is_some() {
            let halves = (self.rx.take(), self.tx.take());
            if let Err(e) = self.transport.teardown(halves) {
                tracing::warn!(error = %e, "closing the console device failed");
            }
        }
    }
}
