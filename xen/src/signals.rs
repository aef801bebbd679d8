//! SIGINT and SIGTERM as a stop request for the long-running commands (the backend daemon,
//! `xenvirtio-frontend serve`, `xenvirtio-loopback`): blocked in every thread, and received
//! by one waiter thread, which calls back. No signal handler runs, so the callback may do
//! anything (log, take locks, stop a daemon).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// SIGINT and SIGTERM, blocked by [`StopSignals::block`].
pub struct StopSignals {
    set: libc::sigset_t,
}

impl std::fmt::Debug for StopSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopSignals(SIGINT, SIGTERM)")
    }
}

impl StopSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread and in every thread it starts
    /// afterwards. Call it before any thread is started, so that only the waiter
    /// ([`StopSignals::spawn_waiter`]) receives them.
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; these calls only edit it.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
        }
        // SAFETY: `set` is a valid signal set; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self { set })
    }

    /// Starts a thread named `name` that waits for SIGINT or SIGTERM and then calls `on_stop`
    /// once, with `Some("SIGINT")` or `Some("SIGTERM")`, or with `None` if the wait itself
    /// failed (which takes an invalid signal set).
    pub fn spawn_waiter<F>(self, name: &str, on_stop: F) -> io::Result<()>
    where
        F: FnOnce(Option<&'static str>) + Send + 'static,
    {
        let set = self.set;
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` and `sig` are valid for the call; sigwait only writes `sig`.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                let name = match (rc, sig) {
                    (0, libc::SIGINT) => Some("SIGINT"),
                    (0, _) => Some("SIGTERM"),
                    _ => None,
                };
                on_stop(name);
            })
            .map(drop)
    }

    /// [`StopSignals::spawn_waiter`] for a polling caller: the returned flag is set once a
    /// signal arrived (or the wait failed), right after `announce` was called with it.
    pub fn spawn_flag<F>(self, name: &str, announce: F) -> io::Result<Arc<AtomicBool>>
    where
        F: FnOnce(Option<&'static str>) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        self.spawn_waiter(name, move |signal| {
            announce(signal);
            flag.store(true, Ordering::SeqCst);
        })?;
        Ok(stop)
    }
}
