//! The host side of a net device for tests: a `SOCK_SEQPACKET` listener at a path, as a
//! user-space switch would be (`link = socket:<path>`), that exchanges one frame (behind its
//! 12-byte virtio-net header) per packet with the one backend that connects.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A listening frame socket, and the backend once it connected.
#[derive(Debug)]
pub struct FramePeer {
    path: PathBuf,
    listener: OwnedFd,
    conn: Option<OwnedFd>,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn wait(fd: &OwnedFd, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, count 1.
    let rc = check(unsafe { libc::poll(&mut pfd, 1, ms) })?;
    Ok(rc > 0)
}

impl FramePeer {
    /// Listens at `path`.
    pub fn listen(path: &Path) -> io::Result<FramePeer> {
        let addr = crate::net::unix_addr(path)?;
        // SAFETY: socket(2) with constant arguments.
        let fd = check(unsafe {
            libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `fd` is new and owned by nothing else.
        let listener = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `addr` is a valid `sockaddr_un` of the size passed.
        check(unsafe {
            libc::bind(
                listener.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen(2) on our own socket.
        check(unsafe { libc::listen(listener.as_raw_fd(), 4) })?;
        Ok(FramePeer {
            path: path.to_owned(),
            listener,
            conn: None,
        })
    }

    /// The socket's path (the `link` key is `socket:` and this).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for the backend to connect.
    pub fn accept(&mut self, timeout: Duration) -> io::Result<()> {
        if self.conn.is_some() {
            return Ok(());
        }
        if !wait(&self.listener, libc::POLLIN, timeout)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no backend connected",
            ));
        }
        // SAFETY: accept4(2) on our listener; no address is asked for.
        let fd = check(unsafe {
            libc::accept4(
                self.listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` is new and owned by nothing else.
        self.conn = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(())
    }

    fn conn(&self) -> io::Result<&OwnedFd> {
        self.conn
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "accept first"))
    }

    /// Sends one packet (a header and a frame) to the backend.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        xenvirtio_tap::write_packet(self.conn()?.as_fd(), packet).map(|_| ())
    }

    /// The next packet from the backend, waiting up to `timeout`; `None` if none came.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let c = self.conn()?;
        if !wait(c, libc::POLLIN, timeout)? {
            return Ok(None);
        }
        let mut buf = vec![0u8; 70_000];
        let n = xenvirtio_tap::read_packet(c.as_fd(), &mut buf)?;
        buf.truncate(n);
        Ok(Some(buf))
    }
}
