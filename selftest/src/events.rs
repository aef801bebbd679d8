//! Waiting for event-channel notifications through a `mio::Poll`, the way the daemons do.
//!
//! [`EventWaiter`] registers one event-channel handle's file descriptor in its own poll and
//! hands back the ports that fired. It owns the evtchn read/unmask protocol for the checks: a
//! port read from the handle is masked until it is unmasked, and a notification that arrives
//! while it is masked is delivered once more at unmask. It never binds or unbinds ports.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use xenvirtio_xen::Port;
use xenvirtio_xen::platform::EventChannels;

/// One event-channel handle, registered in a poll of its own.
pub struct EventWaiter<E: EventChannels> {
    channels: Arc<E>,
    poll: Poll,
    events: Events,
}

impl<E: EventChannels> std::fmt::Debug for EventWaiter<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWaiter")
            .field("fd", &self.channels.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl<E: EventChannels> EventWaiter<E> {
    /// Registers `channels`' file descriptor (readable while a port is pending).
    pub fn new(channels: Arc<E>) -> Result<Self> {
        let poll = Poll::new().context("creating a mio poll failed")?;
        let fd = channels.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), Token(0), Interest::READABLE)
            .context("registering the event-channel fd in a mio poll failed")?;
        Ok(Self {
            channels,
            poll,
            events: Events::with_capacity(4),
        })
    }

    /// Waits until some port is pending or `timeout` passes; returns the pending ports, each
    /// left masked (empty on timeout).
    pub fn wait_masked(&mut self, timeout: Duration) -> Result<Vec<Port>> {
        let deadline = Instant::now() + timeout;
        loop {
            // The poll is edge-triggered: drain first, so that nothing already pending waits
            // for an edge that never comes.
            let ports = self.channels.pending().context("reading pending ports")?;
            if !ports.is_empty() {
                return Ok(ports);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            match self.poll.poll(&mut self.events, Some(deadline - now)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("polling the event-channel fd failed"),
            }
        }
    }

    /// Waits until `port` fires or `timeout` passes. Every port read on the way is unmasked.
    /// Returns how long it took, `None` on timeout.
    pub fn wait_for(&mut self, port: Port, timeout: Duration) -> Result<Option<Duration>> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ports = self.wait_masked(left)?;
            if ports.is_empty() {
                return Ok(None);
            }
            self.channels
                .unmask(&ports)
                .context("unmasking pending ports")?;
            if ports.contains(&port) {
                return Ok(Some(start.elapsed()));
            }
        }
    }

    /// Reads and unmasks whatever is pending now, without waiting.
    pub fn drain(&mut self) -> Result<Vec<Port>> {
        let ports = self.channels.pending().context("reading pending ports")?;
        if !ports.is_empty() {
            self.channels
                .unmask(&ports)
                .context("unmasking pending ports")?;
        }
        Ok(ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_xen::loopback::LoopbackXen;
    use xenvirtio_xen::platform::Platform;

    #[test]
    fn a_notification_is_seen_and_a_silent_port_times_out() {
        let hv = LoopbackXen::new();
        let (a, b) = (hv.domain(0), hv.domain(4));
        let ea = Arc::new(a.event_channels().unwrap());
        let eb = Arc::new(b.event_channels().unwrap());
        let pa = ea.bind_unbound(4).unwrap();
        let pb = eb.bind_interdomain(0, pa).unwrap();
        let mut wa = EventWaiter::new(ea.clone()).unwrap();
        let mut wb = EventWaiter::new(eb.clone()).unwrap();
        wb.drain().unwrap(); // the event Xen leaves pending on a new interdomain binding
        assert_eq!(wa.wait_for(pa, Duration::from_millis(50)).unwrap(), None);
        eb.notify(pb).unwrap();
        assert!(wa.wait_for(pa, Duration::from_secs(5)).unwrap().is_some());
        assert!(wa.drain().unwrap().is_empty());
    }
}
