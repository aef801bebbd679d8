//! A blk device that stays connected: when the backend leaves Connected (it restarted, it
//! closed the device after an error, the device was detached and attached again), the
//! connection is torn down by the protocol's rules and made again, and the blocking calls of
//! the meantime wait for it instead of failing. This is what a long-running export
//! (`xenvirtio-frontend serve`) needs.
//!
//! This module owns one supervisor thread per device and the current [`BlkDevice`]. It only
//! retries requests that the driver refused as [`BlkError::Stopped`] because the connection
//! went away, and only within the caller's wait ([`SupervisedBlk::retry_wait`]); every blk
//! request is idempotent (the same data to the same sectors), so a write the old connection
//! may already have done is simply done again. Device errors (`IOERR`, out of range, a
//! timeout of a backend that hangs while Connected) are returned as they are, never retried.
//! It never reconnects after [`SupervisedBlk::close`].
//!
//! A device that was detached (its xenstore directory is gone) and not attached again within
//! the detach grace ([`DEFAULT_DETACH_GRACE`]) is given up: [`SupervisedBlk::detached`] says why,
//! every request from then on fails at once instead of waiting, and the supervisor stops. The
//! grace is what lets a detach and an attach back to back stay a pause.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xenvirtio_xen::platform::Platform;

use crate::blk::{BlkDevice, BlkError, BlkOp, BlkOptions, io_error};
use crate::transport::{ConnectError, Frontend};

/// How often the supervisor looks at the connection.
const TICK: Duration = Duration::from_millis(100);
/// Longest pause between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long the blocking calls wait for a reconnection by default.
pub const DEFAULT_RETRY_WAIT: Duration = Duration::from_secs(60);
/// How long a detached device may stay away before it is given up.
pub const DEFAULT_DETACH_GRACE: Duration = Duration::from_secs(10);

/// How long the supervisor and its callers wait.
#[derive(Debug, Clone, Copy)]
pub struct Waits {
    /// How long a blocking call waits for a lost connection to come back.
    pub retry: Duration,
    /// How long a detached device may stay away before it is given up.
    pub detach_grace: Duration,
}

impl Default for Waits {
    fn default() -> Self {
        Self {
            retry: DEFAULT_RETRY_WAIT,
            detach_grace: DEFAULT_DETACH_GRACE,
        }
    }
}

/// What the supervisor thread and the callers share.
struct Shared<P: Platform> {
    frontend: Frontend<P>,
    devid: u32,
    options: BlkOptions,
    current: Mutex<Option<Arc<BlkDevice<P>>>>,
    /// Signalled when a device is connected, or when a caller saw the device stop.
    changed: Condvar,
    stop: AtomicBool,
    reconnects: AtomicU64,
    detach_grace: Duration,
    /// Why the device was given up (see the module documentation).
    detached: Mutex<Option<String>>,
}

/// A blk device that the frontend reconnects whenever its connection is lost (see the module
/// documentation). Exported over NBD like a [`BlkDevice`].
pub struct SupervisedBlk<P: Platform> {
    shared: Arc<Shared<P>>,
    thread: Option<JoinHandle<()>>,
    size: u64,
    read_only: bool,
    can_flush: bool,
    can_trim: bool,
    retry_wait: Duration,
}

impl<P: Platform> std::fmt::Debug for SupervisedBlk<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisedBlk")
            .field("devid", &self.shared.devid)
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

impl<P> SupervisedBlk<P>
where
    P: Platform + Clone + Send + Sync + 'static,
{
    /// Connects blk device `devid` (an error of this first connection is returned as it is)
    /// and starts the supervisor. Blocking calls wait up to `retry_wait` for a lost connection
    /// to come back; a detached device is given up after [`DEFAULT_DETACH_GRACE`].
    pub fn connect(
        frontend: Frontend<P>,
        devid: u32,
        options: BlkOptions,
        retry_wait: Duration,
    ) -> Result<Self, ConnectError> {
        Self::connect_with(
            frontend,
            devid,
            options,
            Waits {
                retry: retry_wait,
                ..Waits::default()
            },
        )
    }

    /// [`Self::connect`] with both waits chosen.
    pub fn connect_with(
        frontend: Frontend<P>,
        devid: u32,
        options: BlkOptions,
        waits: Waits,
    ) -> Result<Self, ConnectError> {
        let retry_wait = waits.retry;
        let first = frontend.connect_blk(devid, &options)?;
        let size = first.size();
        let read_only = first.read_only();
        let can_flush = first.supports(BlkOp::Flush);
        let can_trim = first.supports(BlkOp::Discard);
        let shared = Arc::new(Shared {
            frontend,
            devid,
            options,
            current: Mutex::new(Some(Arc::new(first))),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            detach_grace: waits.detach_grace,
            detached: Mutex::new(None),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("xv-supervise-{devid}"))
                .spawn(move || supervise(&shared))
                .map_err(|e| {
                    tracing::warn!(devid, error = %e, "cannot start the supervisor thread");
                })
                .ok()
        };
        Ok(Self {
            shared,
            thread,
            size,
            read_only,
            can_flush,
            can_trim,
            retry_wait,
        })
    }
}

impl<P: Platform> SupervisedBlk<P> {
    /// The device number.
    pub fn devid(&self) -> u32 {
        self.shared.devid
    }

    /// How many times the connection was made again.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::SeqCst)
    }

    /// How long a blocking call waits for a lost connection to come back.
    pub fn retry_wait(&self) -> Duration {
        self.retry_wait
    }

    /// Why the device was given up, once it has been: it was detached and not attached again
    /// within the detach grace. Every request fails at once from then on.
    pub fn detached(&self) -> Option<String> {
        self.shared.detached()
    }

    /// The connected device, if there is one now.
    pub fn current(&self) -> Option<Arc<BlkDevice<P>>> {
        self.shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until a device is connected, up to `deadline`.
    fn wait_connected(&self, deadline: Instant) -> Result<Arc<BlkDevice<P>>, BlkError> {
        let mut current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Err(BlkError::Stopped {
                    reason: "the device is being closed".into(),
                });
            }
            if let Some(reason) = self.shared.detached() {
                return Err(BlkError::Stopped { reason });
            }
            if let Some(dev) = current.as_ref().filter(|d| d.stopped().is_none()) {
                return Ok(Arc::clone(dev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BlkError::Stopped {
                    reason: format!(
                        "blk device {} did not reconnect within {:?}",
                        self.shared.devid, self.retry_wait
                    ),
                });
            }
            current = self
                .shared
                .changed
                .wait_timeout(current, left.min(TICK))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Runs `op` on the connected device; a request refused because the connection went
    /// away is run again on the next connection, within [`Self::retry_wait`].
    pub fn run<T>(
        &self,
        mut op: impl FnMut(&BlkDevice<P>) -> Result<T, BlkError>,
    ) -> Result<T, BlkError> {
        let deadline = Instant::now() + self.retry_wait;
        loop {
            let dev = self.wait_connected(deadline)?;
            match op(&dev) {
                Err(BlkError::Stopped { reason })
                    if dev.stopped().is_some() && !self.shared.stop.load(Ordering::SeqCst) =>
                {
                    tracing::debug!(devid = self.shared.devid, %reason, "request refused by a lost connection; waiting for the next one");
                    drop(dev);
                    self.shared.changed.notify_all();
                }
                result => return result,
            }
        }
    }

    /// Stops the supervisor and closes the device (Closing, wait for the backend's Closed,
    /// revoke, Closed).
    pub fn close(mut self) -> Result<(), ConnectError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ConnectError> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!(devid = self.shared.devid, "the supervisor thread panicked");
            }
        }
        let dev = self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match dev {
            Some(dev) => close_when_unused(dev, self.shared.devid),
            None => Ok(()),
        }
    }
}

impl<P: Platform> Drop for SupervisedBlk<P> {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::debug!(devid = self.shared.devid, error = %e, "closing on drop");
        }
    }
}

/// Closes `dev` once the callers that still hold it (whose requests fail at once on a lost
/// connection) have let go.
fn close_when_unused<P: Platform>(
    mut dev: Arc<BlkDevice<P>>,
    devid: u32,
) -> Result<(), ConnectError> {
    loop {
        match Arc::try_unwrap(dev) {
            Ok(dev) => return dev.close(),
            Err(still_shared) => {
                dev = still_shared;
                std::thread::sleep(Duration::from_millis(10));
                tracing::trace!(devid, "waiting for callers to let go of the device");
            }
        }
    }
}

impl<P: Platform> Shared<P> {
    fn detached(&self) -> Option<String> {
        self.detached
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn supervise<P>(shared: &Shared<P>)
where
    P: Platform + Clone,
{
    let devid = shared.devid;
    let mut backoff = Duration::from_millis(100);
    let mut last_error: Option<String> = None;
    // Since when the device's directory has been missing, while reconnecting.
    let mut missing_since: Option<Instant> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        let lost = {
            let mut current = shared
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match current.as_ref().map(|d| d.stopped()) {
                Some(Some(reason)) => current.take().map(|d| (d, reason)),
                Some(None) => {
                    let _ = shared
                        .changed
                        .wait_timeout(current, TICK)
                        .unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                None => None,
            }
        };
        if let Some((dev, reason)) = lost {
            tracing::info!(devid, %reason, "the connection was lost; closing it and reconnecting");
            if let Err(e) = close_when_unused(dev, devid) {
                tracing::info!(devid, error = %e, "closing the lost connection did not complete");
            }
        }
        match shared.frontend.connect_blk(devid, &shared.options) {
            Ok(dev) => {
                tracing::info!(devid, dma = %dev.negotiated().strategy, "connected again");
                *shared
                    .current
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(dev));
                shared.reconnects.fetch_add(1, Ordering::SeqCst);
                shared.changed.notify_all();
                backoff = Duration::from_millis(100);
                last_error = None;
                missing_since = None;
            }
            Err(e) => {
                if matches!(e, ConnectError::NoSuchDevice { .. }) {
                    let since = *missing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= shared.detach_grace {
                        let reason = format!(
                            "blk device {devid} was detached: it has been gone from xenstore for \
                             {:?} and was not attached again",
                            shared.detach_grace
                        );
                        tracing::warn!(devid, "{reason}; giving the device up");
                        *shared
                            .detached
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(reason);
                        shared.changed.notify_all();
                        return;
                    }
                } else {
                    missing_since = None;
                }
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::info!(devid, error = %text, "reconnecting failed; retrying");
                    last_error = Some(text);
                }
                let until = Instant::now() + backoff;
                while Instant::now() < until && !shared.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(TICK.min(backoff));
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

impl<P: Platform> crate::nbd::BlockExport for SupervisedBlk<P> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        // The same buffer is filled again by a retry.
        self.run(|dev| dev.read_at(buf, offset)).map_err(io_error)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.run(|dev| dev.write_at(buf, offset)).map_err(io_error)
    }

    fn can_flush(&self) -> bool {
        self.can_flush
    }

    fn flush(&self) -> std::io::Result<()> {
        self.run(|dev| dev.flush()).map_err(io_error)
    }

    /// As for [`BlkDevice`]: one device behind every connection, and a reconnect changes the
    /// connection to the backend, not what the connections share.
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn can_trim(&self) -> bool {
        self.can_trim
    }

    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.run(|dev| dev.discard(offset, len)).map_err(io_error)
    }

    fn can_write_zeroes(&self) -> bool {
        true
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        self.run(|dev| dev.write_zeroes(offset, len, may_trim))
            .map_err(io_error)
    }
}
