//! The virtio-net driver (virtio 1.2 section 5.1): one queue pair, no control queue, no offload.
//!
//! Queue 0 (receiveq1) always has [`RX_BUFFERS`] device-writable buffers posted, each a header
//! and the largest frame the MTU allows; queue 1 (transmitq1) carries one frame per chain, behind
//! a header that asks for nothing. The halves are separate objects ([`NetRx`], [`NetTx`]) with
//! their own queues and event channels, so one thread receives while another sends. What the
//! backend hands back is checked: a used length shorter than a header and an Ethernet header,
//! or longer than the buffer, is dropped and counted, never read beyond the buffer.
//!
//! [`tap_relay`] joins the two halves to a TAP interface in this domain: the guest's kernel then
//! has a network interface (the Debian 12 path, where VDUSE is missing).

pub mod tap_relay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use xenvirtio_virtio::features::{self, net as nf};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::net::{self, ETH_HLEN, HDR_SIZE, MacAddr, NetConfig, NetHeader};
use xenvirtio_xen::platform::Platform;

use crate::dma::{Arena, DmaBuf};
use crate::queue::{AddError, DriverError, Virtqueue};
use crate::transport::{
    ConnectError, ConnectOptions, Frontend, Link, Negotiated, QueueCount, Transport,
};

/// Receive buffers kept posted.
pub const RX_BUFFERS: usize = 64;

/// What the driver counted.
#[derive(Debug, Default)]
pub struct NetDriverCounters {
    /// Frames received and handed on.
    pub rx_frames: AtomicU64,
    /// Frames sent.
    pub tx_frames: AtomicU64,
    /// Frames dropped: a used length the backend had no business giving, or a frame the
    /// caller offered that is too long or too short.
    pub dropped: AtomicU64,
}

/// The receiving half.
pub struct NetRx<P: Platform> {
    queue: Virtqueue<P::Events, DmaBuf>,
    arena: Arc<Arena>,
    link: Arc<Link>,
    buf_len: usize,
    counters: Arc<NetDriverCounters>,
}

/// The transmitting half.
pub struct NetTx<P: Platform> {
    queue: Virtqueue<P::Events, DmaBuf>,
    arena: Arc<Arena>,
    link: Arc<Link>,
    max_frame: usize,
    counters: Arc<NetDriverCounters>,
}

impl<P: Platform> std::fmt::Debug for NetRx<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetRx")
            .field("buf_len", &self.buf_len)
            .finish()
    }
}

impl<P: Platform> std::fmt::Debug for NetTx<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetTx")
            .field("max_frame", &self.max_frame)
            .finish()
    }
}

/// A connected virtio-net device.
pub struct NetDevice<P: Platform> {
    rx: Option<Mutex<NetRx<P>>>,
    tx: Option<Mutex<NetTx<P>>>,
    mac: MacAddr,
    mtu: u16,
    counters: Arc<NetDriverCounters>,
    transport: Transport<P>,
}

impl<P: Platform> std::fmt::Debug for NetDevice<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("devid", &self.transport.ctx.devid)
            .field("mac", &self.mac)
            .field("mtu", &self.mtu)
            .finish()
    }
}

impl<P: Platform + Clone> Frontend<P> {
    /// Connects net device `devid`.
    pub fn connect_net(
        &self,
        devid: u32,
        options: &ConnectOptions,
    ) -> Result<NetDevice<P>, ConnectError> {
        let bits = features::bit(nf::MAC) | features::bit(nf::MTU) | features::bit(nf::STATUS);
        let (transport, parts) = self.connect_transport(
            devid,
            DeviceKind::Net,
            bits,
            QueueCount::Exactly(2),
            options,
        )?;
        let features_ = transport.negotiated.driver_features;
        let config = NetConfig::from_bytes(&transport.config().bytes);
        let mac = MacAddr(config.mac);
        // Without MTU the device's frames are Ethernet's; an MTU out of range is the backend's
        // error and is clamped, so a buffer is never sized by a hostile number alone.
        let mtu = if features::has(features_, nf::MTU) {
            config.mtu.clamp(net::MIN_MTU, net::MAX_MTU)
        } else {
            net::DEFAULT_MTU
        };
        let arena = transport.arena();
        let mut queues = parts
            .into_iter()
            .map(|p| p.into_virtqueue::<DmaBuf>(features_, Arc::clone(&arena)));
        let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
            unreachable!("the transport set up exactly two queues");
        };
        let counters = Arc::new(NetDriverCounters::default());
        let mut rx = NetRx {
            queue: rxq,
            arena: Arc::clone(&arena),
            link: Arc::clone(&transport.link),
            buf_len: HDR_SIZE + net::max_frame(mtu),
            counters: Arc::clone(&counters),
        };
        let posted = (0..RX_BUFFERS.min(usize::from(rx.queue.size())))
            .take_while(|_| rx.post().is_ok())
            .count();
        if posted == 0 {
            tracing::warn!(devid, "no receive buffer could be posted");
        }
        if let Err(e) = rx.queue.kick() {
            tracing::warn!(devid, error = %e, "kicking the receive queue failed");
        }
        tracing::info!(devid, %mac, mtu, posted, "net device connected");
        let tx = NetTx {
            queue: txq,
            arena,
            link: Arc::clone(&transport.link),
            max_frame: net::max_frame(mtu),
            counters: Arc::clone(&counters),
        };
        Ok(NetDevice {
            rx: Some(Mutex::new(rx)),
            tx: Some(Mutex::new(tx)),
            mac,
            mtu,
            counters,
            transport,
        })
    }
}

impl<P: Platform> NetRx<P> {
    fn post(&mut self) -> Result<(), DriverError> {
        let buf = self.arena.alloc(self.buf_len)?;
        let mut segs = Vec::new();
        buf.encode(0, self.buf_len, usize::MAX, &mut segs);
        self.queue.add_simple(&[], &segs, buf)?;
        Ok(())
    }

    /// Receives one frame (without its header) into `out`, which must hold the largest frame,
    /// waiting up to `timeout`. `Ok(None)` on timeout. A completion that cannot be a frame is
    /// dropped and counted, and its buffer posted again.
    pub fn recv(
        &mut self,
        out: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<Option<usize>, DriverError> {
        loop {
            let Some((buf, len)) = self.queue.wait_pop(&self.link, timeout)? else {
                return Ok(None);
            };
            let len = len as usize;
            let frame = len
                .checked_sub(HDR_SIZE)
                .filter(|&f| len <= buf.len() && f >= ETH_HLEN && f <= out.len());
            let got = match frame {
                Some(n) => {
                    buf.bounce_out(HDR_SIZE, &mut out[..n])?;
                    Some(n)
                }
                None => None,
            };
            drop(buf);
            self.post()?;
            self.queue.kick()?;
            match got {
                Some(n) => {
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(n));
                }
                None => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(len, "dropped a receive completion that is no frame");
                }
            }
        }
    }
}

impl<P: Platform> NetTx<P> {
    /// Sends one frame (an Ethernet frame without a virtio header). Returns false when the
    /// frame was dropped: too long for the MTU or shorter than an Ethernet header. Completed
    /// sends are reaped on the way; when the ring is full this waits up to `timeout` for one.
    pub fn send(&mut self, frame: &[u8], timeout: Option<Duration>) -> Result<bool, DriverError> {
        if frame.len() < ETH_HLEN || frame.len() > self.max_frame {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        while self.queue.pop()?.is_some() {}
        let len = HDR_SIZE + frame.len();
        let buf = self.arena.alloc(len)?;
        buf.bounce_in(0, &NetHeader::default().to_bytes())?;
        buf.bounce_in(HDR_SIZE, frame)?;
        let mut segs = Vec::new();
        buf.encode(0, len, usize::MAX, &mut segs);
        let mut token = buf;
        loop {
            match self.queue.add(&segs, &[], token) {
                Ok(_) => break,
                Err(AddError::Busy(t)) => {
                    token = t;
                    self.queue.kick()?;
                    if self.queue.wait_pop(&self.link, timeout)?.is_none() {
                        return Err(DriverError::Stopped {
                            reason: "the backend took no frame in time".into(),
                        });
                    }
                }
                Err(AddError::Failed(e)) => return Err(e.into()),
            }
        }
        self.queue.kick()?;
        self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

impl<P: Platform> NetDevice<P> {
    /// What the handshake settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.transport.negotiated
    }

    /// The device's MAC address (its config space).
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The MTU (its config space, or 1500).
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The largest frame, without its header.
    pub fn max_frame(&self) -> usize {
        net::max_frame(self.mtu)
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<NetDriverCounters> {
        &self.counters
    }

    /// The receiving half (lock it from the receiving thread).
    pub fn rx(&self) -> &Mutex<NetRx<P>> {
        self.rx.as_ref().expect("the halves live until close")
    }

    /// The transmitting half (lock it from the sending thread).
    pub fn tx(&self) -> &Mutex<NetTx<P>> {
        self.tx.as_ref().expect("the halves live until close")
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> Result<bool, DriverError> {
        self.tx()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(frame, Some(Duration::from_secs(30)))
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

impl<P: Platform> Drop for NetDevice<P> {
    fn drop(&mut self) {
        if self.rx.is_some() || self.tx.is_some() {
            let halves = (self.rx.take(), self.tx.take());
            if let Err(e) = self.transport.teardown(halves) {
                tracing::warn!(error = %e, "closing the net device failed");
            }
        }
    }
}
