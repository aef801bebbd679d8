//! The byte pipes to xenstored: a unix socket (dom0 tools, tests) or `/dev/xen/xenbus` (a
//! guest's kernel, which relays to the daemon over the ring).
//!
//! This module owns opening them, in the order libxenstore uses, and the two write rules: the
//! kernel device wants each message in exactly one `write()`, and a socket write must never
//! raise SIGPIPE. It never interprets the bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::error::XsError;

/// The socket paths tried after `$XENSTORED_PATH`, in order.
pub const DEFAULT_SOCKET_PATHS: [&str; 2] = ["/run/xenstored/socket", "/var/run/xenstored/socket"];
/// The guest kernel's xenstore device.
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// The environment variable libxenstore reads for the daemon's socket.
pub const XENSTORED_PATH_ENV: &str = "XENSTORED_PATH";

/// An open transport.
#[derive(Debug)]
pub(crate) enum Transport {
    /// A connected unix stream socket.
    Socket(UnixStream),
    /// The xenbus character device.
    Xenbus(File),
}

impl Transport {
    pub(crate) fn connect_socket(path: &Path) -> io::Result<Transport> {
        Ok(Transport::Socket(UnixStream::connect(path)?))
    }

    pub(crate) fn open_device(path: &Path) -> io::Result<Transport> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(Transport::Xenbus(file))
    }

    /// Opens `path` as what it is: a socket is connected, anything else is opened as a
    /// xenbus-style device (libxenstore accepts either in `$XENSTORED_PATH`).
    pub(crate) fn open_path(path: &Path) -> io::Result<Transport> {
        let meta = std::fs::metadata(path)?;
        if meta.file_type().is_socket() {
            Transport::connect_socket(path)
        } else {
            Transport::open_device(path)
        }
    }

    /// Tries `$XENSTORED_PATH`, the default sockets, then `/dev/xen/xenbus`.
    pub(crate) fn open_default() -> Result<(Transport, String), XsError> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os(XENSTORED_PATH_ENV).filter(|p| !p.is_empty()) {
            candidates.push(PathBuf::from(p));
        }
        candidates.extend(DEFAULT_SOCKET_PATHS.iter().map(PathBuf::from));
        let mut tried = Vec::new();
        for path in &candidates {
            match Transport::open_path(path) {
                Ok(t) => return Ok((t, path.display().to_string())),
                Err(e) => tried.push((path.display().to_string(), e.to_string())),
            }
        }
        match Transport::open_device(Path::new(XENBUS_DEVICE)) {
            Ok(t) => Ok((t, XENBUS_DEVICE.to_owned())),
            Err(e) => {
                tried.push((XENBUS_DEVICE.to_owned(), e.to_string()));
                Err(XsError::TransportNotFound { tried })
            }
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Transport> {
        Ok(match self {
            Transport::Socket(s) => Transport::Socket(s.try_clone()?),
            Transport::Xenbus(f) => Transport::Xenbus(f.try_clone()?),
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Transport::Socket(s) => s.as_raw_fd(),
            Transport::Xenbus(f) => f.as_raw_fd(),
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Transport::Socket(_) => "unix socket",
            Transport::Xenbus(_) => "xenbus device",
        }
    }

    /// Writes one whole message.
    pub(crate) fn write_message(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Socket(s) => send_all_nosignal(s, bytes),
            Transport::Xenbus(f) => loop {
                // The kernel parses each write() as (the rest of) one message: send it whole.
                match f.write(bytes) {
                    Ok(n) if n == bytes.len() => return Ok(()),
                    Ok(n) => {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            format!(
                                "short write to the xenbus device ({n} of {} bytes)",
                                bytes.len()
                            ),
                        ));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            },
        }
    }

    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Socket(s) => s.read(buf),
            Transport::Xenbus(f) => f.read(buf),
        }
    }
}

/// `send(MSG_NOSIGNAL)` until everything is written: a peer that has gone away gives EPIPE,
/// never a SIGPIPE that would kill a host process that did not ignore it.
fn send_all_nosignal(sock: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live slice whose pointer and length describe readable memory
        // for the duration of the call; the fd is owned by `sock`, which outlives the call.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).expect("send returned a non-negative count");
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the socket accepted no bytes",
            ));
        }
        bytes = &bytes[n..];
    }
    Ok(())
}

/// What `wait_readable` saw.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The transport has bytes (or EOF, or an error) to read.
    Readable,
    /// The stop fd became readable: the client is closing.
    Stop,
}

/// Blocks until `fd` or `stop_fd` is readable (or hung up).
pub(crate) fn wait_readable(fd: RawFd, stop_fd: RawFd) -> io::Result<Wake> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop_fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two initialised pollfd structs that lives across
        // the call, and its length is passed exactly.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(Wake::Stop);
        }
        if fds[0].revents != 0 {
            return Ok(Wake::Readable);
        }
    }
}
