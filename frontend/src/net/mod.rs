//! The virtio-net driver (virtio 1.2 section 5.1): one queue pair, no control queue, checksum
//! offload both ways when the device offers it (`CSUM`, `GUEST_CSUM`), no segmentation offload.
//!
//! Queue 0 (receiveq1) always has [`RX_BUFFERS`] device-writable buffers posted, each a header
//! and the largest frame the MTU allows; queue 1 (transmitq1) carries one frame per chain, behind
//! a header that asks for at most a partial checksum. The halves are separate objects
//! ([`NetRx`], [`NetTx`]) with their own queues and event channels, so one thread receives while
//! another sends. What the backend hands back is checked: a used length shorter than a header and
//! an Ethernet header, or longer than the buffer, and a header that asks for what was not
//! negotiated, are dropped and counted, never read beyond the buffer.
//!
//! [`tap_relay`] joins the two halves to a TAP interface in this domain: the guest's kernel then
//! has a network interface (the Debian 12 path, where VDUSE is missing).

pub mod tap_relay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use xenvirtio_virtio::features::{self, net as nf};
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::net::{
    self, ETH_HLEN, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, HDR_SIZE, MacAddr, NetConfig, NetHeader,
};
use xenvirtio_xen::platform::Platform;

use crate::dma::{Arena, DmaBuf};
use crate::queue::{AddError, DriverError, Virtqueue};
use crate::transport::{
    ConnectError, ConnectOptions, Frontend, Link, Negotiated, QueueCount, Transport,
};

/// Receive buffers kept posted.
pub const RX_BUFFERS: usize = 64;
/// Transmit chains in flight at most: with [`RX_BUFFERS`], a bound on the DMA memory the device
/// holds (each buffer of a 1500-byte MTU is one page; the default arena has 256).
pub const TX_IN_FLIGHT: usize = 64;

/// How long a half waits for the device before notifying it again regardless of the ring's
/// notification suppression (the receiving half: only while frames are coming).
pub const WATCHDOG: Duration = Duration::from_millis(20);
/// How long after a frame the receiving half counts as in a burst.
const BURST: Duration = Duration::from_secs(1);

/// What the driver counted.
#[derive(Debug, Default)]
pub struct NetDriverCounters {
    /// Notifications sent because the device seemed to have missed one ([`WATCHDOG`]).
    pub watchdog_kicks: AtomicU64,
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
    /// Buffers to post: fewer are posted while DMA memory is short.
    want_posted: usize,
    /// `GUEST_CSUM` was negotiated: a frame may come with a partial checksum.
    guest_csum: bool,
    /// When the last frame came.
    last_frame: Option<std::time::Instant>,
    counters: Arc<NetDriverCounters>,
}

/// The transmitting half.
pub struct NetTx<P: Platform> {
    queue: Virtqueue<P::Events, DmaBuf>,
    arena: Arc<Arena>,
    link: Arc<Link>,
    max_frame: usize,
    /// `CSUM` was negotiated: a frame may go with a partial checksum.
    csum: bool,
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
        let bits = features::bit(nf::CSUM)
            | features::bit(nf::GUEST_CSUM)
            | features::bit(nf::MAC)
            | features::bit(nf::MTU)
            | features::bit(nf::STATUS);
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
        let want_posted = RX_BUFFERS.min(usize::from(rxq.size()));
        let mut rx = NetRx {
            queue: rxq,
            arena: Arc::clone(&arena),
            link: Arc::clone(&transport.link),
            buf_len: HDR_SIZE + net::max_frame(mtu),
            want_posted,
            guest_csum: features::has(features_, nf::GUEST_CSUM),
            last_frame: None,
            counters: Arc::clone(&counters),
        };
        let posted = rx.refill();
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
            csum: features::has(features_, nf::CSUM),
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

    /// Posts buffers until [`RX_BUFFERS`] are out, or DMA memory runs short for now (the rest
    /// are posted after the next frame). Returns how many are posted.
    fn refill(&mut self) -> usize {
        while self.queue.in_flight() < self.want_posted {
            if let Err(e) = self.post() {
                tracing::debug!(error = %e, "a receive buffer cannot be posted now");
                break;
            }
        }
        self.queue.in_flight()
    }

    /// Receives one frame (without its header) into `out`, which must hold the largest frame,
    /// waiting up to `timeout`. `Ok(None)` on timeout. A completion that cannot be a frame is
    /// dropped and counted, and its buffer posted again.
    pub fn recv(
        &mut self,
        out: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<Option<usize>, DriverError> {
        Ok(self.recv_frame(out, timeout)?.map(|(n, _)| n))
    }

    /// [`Self::recv`], with the frame's header: at most a partial checksum's place
    /// (`NEEDS_CSUM`, under `GUEST_CSUM`) or `DATA_VALID`, checked to lie inside the frame.
    pub fn recv_frame(
        &mut self,
        out: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<Option<(usize, NetHeader)>, DriverError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let Some((buf, len)) = self.queue.wait_pop(&self.link, Some(WATCHDOG))? else {
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    return Ok(None);
                }
                // Nothing came for a moment in the middle of a burst: the device is told again
                // of the buffers it has, in case it missed their notification.
                if self.last_frame.is_some_and(|t| t.elapsed() < BURST) {
                    self.queue.events().notify()?;
                    self.counters.watchdog_kicks.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            self.last_frame = Some(std::time::Instant::now());
            let len = len as usize;
            let frame = len
                .checked_sub(HDR_SIZE)
                .filter(|&f| len <= buf.len() && f >= ETH_HLEN && f <= out.len());
            let got = match frame {
                Some(n) => {
                    let mut h = [0u8; HDR_SIZE];
                    buf.bounce_out(0, &mut h)?;
                    let h = NetHeader::from_bytes(&h);
                    let allowed = if self.guest_csum {
                        HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID
                    } else {
                        0
                    };
                    match h.checked(allowed, n) {
                        Some(header) => {
                            buf.bounce_out(HDR_SIZE, &mut out[..n])?;
                            Some((n, header))
                        }
                        None => None,
                    }
                }
                None => None,
            };
            drop(buf);
            if self.refill() == 0 {
                return Err(DriverError::Stopped {
                    reason: "no receive buffer can be posted: DMA memory is exhausted".into(),
                });
            }
            self.queue.kick()?;
            match got {
                Some(frame) => {
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(frame));
                }
                None => {
                    if self.counters.dropped.fetch_add(1, Ordering::Relaxed) < 8 {
                        tracing::info!(len, "dropped a receive completion that is no frame");
                    }
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
        self.send_frame(&NetHeader::default(), frame, timeout)
    }

    /// [`Self::send`] behind `header`, which may ask for a partial checksum to be completed
    /// (`NEEDS_CSUM` at `csum_start`, `csum_offset`, inside the frame: passed to a device that
    /// negotiated `CSUM`, completed here for one that did not) and nothing else; a frame whose
    /// header asks for more is dropped (false).
    pub fn send_frame(
        &mut self,
        header: &NetHeader,
        frame: &[u8],
        timeout: Option<Duration>,
    ) -> Result<bool, DriverError> {
        let checked = header
            .checked(HDR_F_NEEDS_CSUM, frame.len())
            .filter(|_| (ETH_HLEN..=self.max_frame).contains(&frame.len()));
        let Some(mut clean) = checked else {
            if self.counters.dropped.fetch_add(1, Ordering::Relaxed) < 8 {
                tracing::info!(
                    len = frame.len(),
                    flags = header.flags,
                    gso_type = header.gso_type,
                    "a frame to send was dropped"
                );
            }
            return Ok(false);
        };
        // A device that takes no partial checksum gets the checksum completed here.
        let completed;
        let frame = if clean.flags & HDR_F_NEEDS_CSUM != 0 && !self.csum {
            let mut f = frame.to_vec();
            net::complete_checksum(&mut f, clean.csum_start, clean.csum_offset);
            clean = NetHeader::default();
            completed = f;
            &completed[..]
        } else {
            frame
        };
        while self.queue.pop()?.is_some() {}
        // A bound on what is in flight, and so on the DMA memory sends hold. While waiting for
        // room the device is notified again every WATCHDOG, whatever the ring's suppression
        // says: a notification it missed must cost a moment, not the stream.
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while self.queue.in_flight() >= TX_IN_FLIGHT {
            self.queue.kick()?;
            if self.queue.wait_pop(&self.link, Some(WATCHDOG))?.is_some() {
                continue;
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Err(DriverError::Stopped {
                    reason: "the backend took no frame in time".into(),
                });
            }
            self.queue.events().notify()?;
            self.counters.watchdog_kicks.fetch_add(1, Ordering::Relaxed);
        }
        let len = HDR_SIZE + frame.len();
        let buf = self.arena.alloc(len)?;
        buf.bounce_in(0, &clean.to_bytes())?;
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

    /// Whether frames may go to the device with a partial checksum (`CSUM` negotiated).
    pub fn csum_offload(&self) -> bool {
        features::has(self.transport.negotiated.driver_features, nf::CSUM)
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<NetDriverCounters> {
        &self.counters
    }

    /// The device's notifications, both queues together: sent, received, suppressed.
    pub fn event_stats(&self) -> crate::queue::EventStats {
        self.transport.event_stats()
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
