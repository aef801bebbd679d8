//! A TAP interface in this domain, joined to a [`NetDevice`]: what the guest's kernel sends on
//! the TAP goes out on the transmit queue, what the backend delivers on the receive queue is
//! written to the TAP. The guest then has a network interface without VDUSE (Debian 12), with
//! every DMA strategy the role allows.
//!
//! The TAP takes the device's MAC address and MTU, and is brought up; giving it an address is
//! the operator's (`ip addr add`, DHCP). Where the device takes partial checksums (`CSUM`), the
//! TAP is told so (`TUNSETOFFLOAD`), and the guest's kernel leaves them to Dom0; the headers of
//! both directions are passed through, as checked by the driver. Two threads move the frames, one
//! per direction; both look at the stop flag at least every [`POLL`] and end when the device
//! stops.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use xenvirtio_tap::{Tap, VNET_HDR_SIZE};
use xenvirtio_virtio::net::{HDR_SIZE, NetHeader};
use xenvirtio_xen::platform::Platform;

use super::NetDevice;
use crate::queue::DriverError;

/// How often the relay threads look at the stop flag.
pub const POLL: Duration = Duration::from_millis(100);

/// The default name of the guest's interface for device `devid`.
pub fn default_name(devid: u32) -> String {
    format!("xvnet{devid}")
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[error("TAP {name}: {what}")]
pub struct RelayError {
    /// The interface.
    pub name: String,
    /// The step that failed.
    pub what: &'static str,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// A running relay.
#[derive(Debug)]
pub struct TapRelay {
    name: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TapRelay {
    /// Creates the TAP `name` with the device's address and MTU, brings it up, and starts the
    /// two threads. They end when `stop` is set, the device stops, or the TAP fails.
    pub fn start<P: Platform + Send + Sync + 'static>(
        dev: Arc<NetDevice<P>>,
        name: &str,
        stop: Arc<AtomicBool>,
    ) -> Result<TapRelay, RelayError>
    where
        P::Events: Send,
    {
        let step = |what: &'static str| {
            move |source| RelayError {
                name: name.to_owned(),
                what,
                source,
            }
        };
        let tap = Tap::create(name, false).map_err(step("creating it"))?;
        let name = tap.name().to_owned();
        xenvirtio_tap::set_mac(&name, dev.mac().0).map_err(step("setting its address"))?;
        xenvirtio_tap::set_mtu(&name, dev.mtu()).map_err(step("setting its MTU"))?;
        if dev.csum_offload() {
            tap.set_offload(xenvirtio_tap::OFFLOAD_CSUM)
                .map_err(step("enabling checksum offload"))?;
        }
        xenvirtio_tap::set_up(&name).map_err(step("bringing it up"))?;
        let tap = Arc::new(tap);
        let mut threads = Vec::new();
        {
            let (dev, tap, stop) = (Arc::clone(&dev), Arc::clone(&tap), Arc::clone(&stop));
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-tx"))
                .spawn(move || tap_to_device(&dev, &tap, &stop));
            threads.push(spawned.map_err(step("starting its transmit thread"))?);
        }
        {
            let (tap, stop2) = (Arc::clone(&tap), Arc::clone(&stop));
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-rx"))
                .spawn(move || device_to_tap(&dev, &tap, &stop2));
            threads.push(spawned.map_err(step("starting its receive thread"))?);
        }
        Ok(TapRelay {
            name,
            stop,
            threads,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops both threads and waits for them; the TAP goes with the last of them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Logs what the driver counted, with the interface's name.
    pub fn log_counters<P: Platform>(&self, dev: &NetDevice<P>) {
        let c = dev.counters();
        let e = dev.event_stats();
        tracing::info!(
            tap = self.name,
            rx_frames = c.rx_frames.load(Ordering::Relaxed),
            tx_frames = c.tx_frames.load(Ordering::Relaxed),
            dropped = c.dropped.load(Ordering::Relaxed),
            watchdog_kicks = c.watchdog_kicks.load(Ordering::Relaxed),
            notifications_sent = e.sent,
            notifications_received = e.received,
            suppressed = e.suppressed,
            spurious = e.spurious,
            "net device counters"
        );
    }
}

/// Whether `fd` becomes readable within `timeout`.
fn readable(fd: i32, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd, and the count passed is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

/// What the guest's kernel sends on the TAP, out on the transmit queue.
fn tap_to_device<P: Platform>(dev: &NetDevice<P>, tap: &Tap, stop: &AtomicBool) {
    let mut buf = vec![0u8; VNET_HDR_SIZE + dev.max_frame() + 1];
    let mut tx = dev
        .tx()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while !stop.load(Ordering::SeqCst) {
        match readable(tap.as_raw_fd(), POLL) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(tap = tap.name(), error = %e, "polling the TAP failed");
                break;
            }
        }
        let n = match tap.read_frame(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(tap = tap.name(), error = %e, "reading the TAP failed");
                break;
            }
        };
        if n < VNET_HDR_SIZE {
            continue;
        }
        let mut h = [0u8; VNET_HDR_SIZE];
        h.copy_from_slice(&buf[..VNET_HDR_SIZE]);
        // The TAP's header asks for a partial checksum at most (checksum offload is the only one
        // enabled); `send_frame` checks it, and drops (and counts) a frame over the MTU.
        let header = NetHeader::from_bytes(&h);
        match tx.send_frame(
            &header,
            &buf[VNET_HDR_SIZE..n],
            Some(Duration::from_secs(30)),
        ) {
            Ok(_) => {}
            Err(e) => {
                stopped(tap, &e);
                break;
            }
        }
    }
}

/// What the backend delivers on the receive queue, written to the TAP.
fn device_to_tap<P: Platform>(dev: &NetDevice<P>, tap: &Tap, stop: &AtomicBool) {
    let mut buf = vec![0u8; HDR_SIZE + dev.max_frame()];
    let mut refused = 0u64;
    let mut rx = dev
        .rx()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    while !stop.load(Ordering::SeqCst) {
        let n = match rx.recv_frame(&mut buf[HDR_SIZE..], Some(POLL)) {
            Ok(Some((n, header))) => {
                // A partial checksum the guest's kernel completes or trusts, as from a NIC.
                buf[..HDR_SIZE].copy_from_slice(&header.to_bytes());
                n
            }
            Ok(None) => continue,
            Err(e) => {
                stopped(tap, &e);
                break;
            }
        };
        if let Err(e) = tap.write_frame(&buf[..HDR_SIZE + n]) {
            // The interface is down, or its queue full: the frame is lost, as on a wire.
            refused += 1;
            if refused <= 8 {
                tracing::info!(tap = tap.name(), error = %e, len = n, "the TAP refused a frame");
            }
        }
    }
}

fn stopped(tap: &Tap, e: &DriverError) {
    tracing::warn!(tap = tap.name(), error = %e, "the net device stopped");
}
