//! The virtio-console device model (virtio 1.2 section 5.3): port 0 only, without MULTIPORT,
//! connected to a pty or to a unix socket (`docs/PROTOCOL.md` section 10.3).
//!
//! This module owns the host side of the console: the pty (opened with `posix_openpt`, its
//! slave kept open in raw mode so the master never sees a hangup) or the listening socket and
//! its one client, and a bounded buffer of the guest's output. It never touches the queues:
//! the device thread pops receive and transmit chains and moves bytes between them and
//! [`ConsoleDevice::read_input`] / [`ConsoleDevice::write_output`]. It never blocks: every fd
//! is non-blocking and registered in the device thread's poll.
//!
//! **Slow readers.** Output the host side does not take at once waits in a buffer of
//! [`OUTPUT_LIMIT`] bytes; beyond that the oldest bytes are dropped and counted, so a guest
//! is never stalled by an absent or slow reader (a pty nobody reads, a socket without a
//! client). Input is the opposite: it is read only when the guest has posted receive buffers,
//! so a fast writer is held back by the kernel's pty or socket buffer.
//!
//! **Socket mode.** The backend listens on the named path (mode 0600, a stale socket there is
//! replaced) and serves one client at a time; a second client is accepted and closed at once.
//! A client that connects gets the buffered output first.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use xenvirtio_virtio::console::ConsoleConfig;

use crate::handshake::ConsoleTarget;

/// Guest output kept while the host side is not reading, in bytes.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// Why a console could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Opening or configuring the pty failed.
    #[error("cannot open a pty ({step})")]
    Pty {
        /// The call that failed.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
}

/// A pty master with its slave kept open in raw mode.
#[derive(Debug)]
pub struct Pty {
    master: File,
    _slave: OwnedFd,
    path: PathBuf,
}

fn pty_step<T: PartialOrd + Default>(r: T, step: &'static str) -> Result<T, ConsoleError> {
    if r < T::default() {
        Err(ConsoleError::Pty {
            step,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(r)
    }
}

impl Pty {
    /// Opens a new pty: the master non-blocking, the slave in raw mode (no echo, no line
    /// editing, no newline translation), both close-on-exec.
    pub fn open() -> Result<Self, ConsoleError> {
        // SAFETY: posix_openpt takes flags and returns a new fd or -1; no memory is involved.
        let fd = pty_step(
            unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) },
            "posix_openpt",
        )?;
        // SAFETY: `fd` was just returned by posix_openpt and is owned by nobody else.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: grantpt and unlockpt take an fd we own and touch no memory of ours.
        pty_step(unsafe { libc::grantpt(master.as_raw_fd()) }, "grantpt")?;
        // SAFETY: as above.
        pty_step(unsafe { libc::unlockpt(master.as_raw_fd()) }, "unlockpt")?;
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated string of at most `name.len()` bytes into
        // `name`, which is valid and writable for that length.
        let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if r != 0 {
            return Err(ConsoleError::Pty {
                step: "ptsname_r",
                source: io::Error::from_raw_os_error(r),
            });
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
        let path = PathBuf::from(
            unsafe { CStr::from_ptr(name.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        );
        let slave: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| ConsoleError::Pty {
                step: "open the slave",
                source,
            })?
            .into();
        // SAFETY: termios is plain data; tcgetattr fills it from the slave fd we own.
        let mut tio: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `tio` is a valid, writable termios and the fd is ours.
        let r = unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut tio) };
        pty_step(r, "tcgetattr")?;
        // SAFETY: cfmakeraw only edits the termios it is given.
        unsafe { libc::cfmakeraw(&mut tio) };
        // SAFETY: `tio` is a valid termios read above and edited by cfmakeraw; the fd is ours.
        let r = unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio) };
        pty_step(r, "tcsetattr")?;
        set_nonblocking(&master).map_err(|source| ConsoleError::Pty {
            step: "O_NONBLOCK",
            source,
        })?;
        Ok(Self {
            master: File::from(master),
            _slave: slave,
            path,
        })
    }

    /// The slave's path (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The listening socket of socket mode, removed on drop.
#[derive(Debug)]
struct Listener {
    socket: UnixListener,
    path: PathBuf,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug)]
enum Endpoint {
    Pty(Pty),
    Socket {
        listener: Listener,
        client: Option<UnixStream>,
    },
}

/// Counters of one console, for `stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleCounters {
    /// Bytes of input delivered to the guest.
    pub bytes_in: u64,
    /// Bytes of guest output taken from the transmit queue.
    pub bytes_out: u64,
    /// Bytes of guest output dropped because the host side did not read them in time.
    pub dropped: u64,
}

/// One console's port 0.
#[derive(Debug)]
pub struct ConsoleDevice {
    endpoint: Endpoint,
    output: VecDeque<u8>,
    input_ready: bool,
    counters: ConsoleCounters,
    io_token: Option<Token>,
}

impl ConsoleDevice {
    /// Opens port 0's host side.
    pub fn open(target: &ConsoleTarget) -> Result<Self, ConsoleError> {
        let endpoint = match target {
            ConsoleTarget::Pty => Endpoint::Pty(Pty::open()?),
            ConsoleTarget::Socket(path) => Endpoint::Socket {
                listener: listen(path)?,
                client: None,
            },
        };
        Ok(Self {
            endpoint,
            output: VecDeque::new(),
            input_ready: false,
            counters: ConsoleCounters::default(),
            io_token: None,
        })
    }

    /// The pty's path, in pty mode.
    pub fn tty(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Pty(p) => Some(p.path()),
            Endpoint::Socket { .. } => None,
        }
    }

    /// Feature bits of the device (none: no SIZE, no MULTIPORT, no EMERG_WRITE).
    pub fn features(&self) -> u64 {
        0
    }

    /// The config space (zero `cols`/`rows`).
    pub fn config(&self) -> Vec<u8> {
        ConsoleConfig::default().to_bytes().to_vec()
    }

    /// The counters so far.
    pub fn counters(&self) -> ConsoleCounters {
        self.counters
    }

    /// Registers the host side: `io` for the pty or the client, `listener` for the socket.
    pub fn register(&mut self, registry: &Registry, io: Token, listener: Token) -> io::Result<()> {
        self.io_token = Some(io);
        match &mut self.endpoint {
            Endpoint::Pty(p) => registry.register(
                &mut SourceFd(&p.master.as_raw_fd()),
                io,
                Interest::READABLE | Interest::WRITABLE,
            ),
            Endpoint::Socket { listener: l, .. } => {
                registry.register(&mut l.socket, listener, Interest::READABLE)
            }
        }
    }

    /// The listener is ready: accepts the waiting clients, keeping the first if none is
    /// connected and closing the others.
    pub fn accept(&mut self, registry: &Registry) {
        let Endpoint::Socket { listener, client } = &mut self.endpoint else {
            return;
        };
        loop {
            match listener.socket.accept() {
                Ok((mut stream, _)) => {
                    if client.is_some() {
                        tracing::debug!("console socket busy: closing a second client");
                        continue;
                    }
                    let Some(token) = self.io_token else { continue };
                    if let Err(e) = registry.register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        tracing::debug!(error = %e, "registering a console client failed");
                        continue;
                    }
                    tracing::debug!("console client connected");
                    *client = Some(stream);
                    self.input_ready = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a console client failed");
                    return;
                }
            }
        }
    }

    /// The pty or the client is ready: input may be waiting, output may be flushed.
    pub fn io_ready(&mut self, registry: &Registry) {
        self.input_ready = true;
        self.flush(registry);
    }

    /// Whether input may be waiting (the device thread then posts it to receive buffers).
    pub fn input_ready(&self) -> bool {
        self.input_ready
    }

    /// Reads available input into `buf`; 0 when there is none now (or no client).
    pub fn read_input(&mut self, registry: &Registry, buf: &mut [u8]) -> usize {
        if buf.is_empty() {
            return 0;
        }
        let r = match &mut self.endpoint {
            Endpoint::Pty(p) => (&p.master).read(buf),
            Endpoint::Socket {
                client: Some(c), ..
            } => c.read(buf),
            Endpoint::Socket { client: None, .. } => {
                self.input_ready = false;
                return 0;
            }
        };
        match r {
            Ok(0) => {
                self.hang_up(registry);
                0
            }
            Ok(n) => {
                self.counters.bytes_in += n as u64;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                self.input_ready = false;
                if e.kind() != io::ErrorKind::WouldBlock {
                    // EIO on a pty whose slave closed, ECONNRESET on a socket.
                    tracing::debug!(error = %e, "console input failed");
                    self.hang_up(registry);
                }
                0
            }
        }
    }

    /// Queues guest output and writes what the host side takes now.
    pub fn write_output(&mut self, registry: &Registry, data: &[u8]) {
        self.counters.bytes_out += data.len() as u64;
        self.output.extend(data);
        if self.output.len() > OUTPUT_LIMIT {
            let excess = self.output.len() - OUTPUT_LIMIT;
            self.output.drain(..excess);
            self.counters.dropped += excess as u64;
        }
        self.flush(registry);
    }

    /// Writes buffered output until the host side would block.
    fn flush(&mut self, registry: &Registry) {
        while !self.output.is_empty() {
            let (head, _) = self.output.as_slices();
            let r = match &mut self.endpoint {
                Endpoint::Pty(p) => (&p.master).write(head),
                Endpoint::Socket {
                    client: Some(c), ..
                } => c.write(head),
                Endpoint::Socket { client: None, .. } => return,
            };
            match r {
                Ok(0) => return,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!(error = %e, "console output failed");
                    self.hang_up(registry);
                    return;
                }
            }
        }
    }

    /// The socket client went away (a pty never hangs up: its slave stays open).
    fn hang_up(&mut self, registry: &Registry) {
        if let Endpoint::Socket { client, .. } = &mut self.endpoint {
            if let Some(mut c) = client.take() {
                let _ = registry.deregister(&mut c);
                tracing::debug!("console client disconnected");
            }
        }
        self.input_ready = false;
    }
}

fn listen(path: &Path) -> Result<Listener, ConsoleError> {
    let err = |source| ConsoleError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => return Err(ConsoleError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let socket = UnixListener::bind(path).map_err(err)?;
    let listener = Listener {
        socket,
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::Duration;

    #[test]
    fn a_pty_carries_both_directions_raw() {
        let poll = Poll::new().unwrap();
        let mut c = ConsoleDevice::open(&ConsoleTarget::Pty).unwrap();
        c.register(poll.registry(), Token(1), Token(2)).unwrap();
        let tty = c.tty().unwrap().to_path_buf();
        assert!(tty.starts_with("/dev/pts"));
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tty)
            .unwrap();
        c.write_output(poll.registry(), b"hello\n");
        let mut got = [0u8; 6];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello\n", "raw mode: no CR added");
        slave.write_all(b"typed").unwrap();
        let mut events = Events::with_capacity(4);
        let mut poll = poll;
        let mut buf = [0u8; 64];
        let mut input = Vec::new();
        for _ in 0..50 {
            poll.poll(&mut events, Some(Duration::from_millis(20)))
                .unwrap();
            c.io_ready(poll.registry());
            let n = c.read_input(poll.registry(), &mut buf);
            input.extend_from_slice(&buf[..n]);
            if input.len() == 5 {
                break;
            }
        }
        assert_eq!(input, b"typed");
        assert_eq!(c.counters().bytes_in, 5);
    }

    #[test]
    fn output_without_a_reader_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let poll = Poll::new().unwrap();
        let mut c = ConsoleDevice::open(&ConsoleTarget::Socket(path.clone())).unwrap();
        c.register(poll.registry(), Token(1), Token(2)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let chunk = vec![b'x'; 1000];
        for _ in 0..100 {
            c.write_output(poll.registry(), &chunk);
        }
        assert_eq!(c.output.len(), OUTPUT_LIMIT);
        assert_eq!(c.counters().dropped, 100_000 - OUTPUT_LIMIT as u64);
        // A client that connects gets the buffered tail.
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        c.accept(poll.registry());
        c.io_ready(poll.registry());
        let mut got = vec![0u8; OUTPUT_LIMIT];
        client.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&b| b == b'x'));
        // A second client is turned away.
        let mut second = std::os::unix::net::UnixStream::connect(&path).unwrap();
        c.accept(poll.registry());
        second
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut one = [0u8; 1];
        assert_eq!(second.read(&mut one).unwrap(), 0, "closed at once");
        drop(c);
        assert!(!path.exists(), "the socket is removed with the device");
    }
}
