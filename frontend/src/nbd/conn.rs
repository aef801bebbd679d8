//! Sockets for the NBD server and client, and the server's shutdown-aware connection I/O.
//!
//! A server connection is a nonblocking socket watched by its own mio `Poll`, together with the
//! read end of the server's shutdown pipe. Reads and writes wait in that poll, so a connection
//! thread blocked on an idle client wakes when the server shuts down, and every wait can carry a
//! deadline (the handshake timeout, the shutdown grace period). This module never interprets
//! the bytes it moves.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

/// A connected stream socket: unix or TCP.
#[derive(Debug)]
pub(crate) enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_nonblocking(on),
            Socket::Tcp(s) => s.set_nonblocking(on),
        }
    }

    pub(crate) fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Socket::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    /// A second descriptor of the same socket (for a writer beside the reader).
    pub(crate) fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        }
    }

    /// A description of the peer for logs.
    pub(crate) fn peer(&self) -> String {
        match self {
            Socket::Unix(_) => "unix".to_owned(),
            Socket::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp".to_owned(), |a| a.to_string()),
        }
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The server's shutdown signal: a flag, and a pipe whose read end becomes readable (and stays
/// so, since nobody reads it) when the flag is raised, to wake every poll that watches it.
#[derive(Debug)]
pub(crate) struct ShutdownSignal {
    raised: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl ShutdownSignal {
    pub(crate) fn new() -> io::Result<ShutdownSignal> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        Ok(ShutdownSignal {
            raised: AtomicBool::new(false),
            wake_tx,
            wake_rx,
        })
    }

    /// Raises the flag, then wakes the watchers (in that order, so a watcher that saw the flag
    /// down before sleeping is woken by the byte).
    pub(crate) fn raise(&self) {
        if !self.raised.swap(true, Ordering::SeqCst) {
            // A full pipe or a failure leaves watchers to notice the flag at their next wake-up;
            // one byte in a fresh socket pair cannot block.
            if let Err(e) = (&self.wake_tx).write(&[1]) {
                tracing::debug!(error = %e, "waking the NBD server's threads failed");
            }
        }
    }

    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// Registers the wake-up pipe in `poll` under `token`.
    pub(crate) fn watch(&self, poll: &Poll, token: Token) -> io::Result<()> {
        poll.registry().register(
            &mut SourceFd(&self.wake_rx.as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }
}

/// Why a connection's I/O stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    /// The peer closed the connection between two messages.
    #[error("the client closed the connection")]
    Closed,
    /// The server is shutting down and no message had started.
    #[error("the server is shutting down")]
    ShutDown,
    /// A deadline passed (handshake timeout, or the grace period after a shutdown).
    #[error("the client did not keep up before the deadline")]
    TimedOut,
    /// The socket failed, or closed in the middle of a message.
    #[error("connection I/O failed")]
    Io(#[source] io::Error),
}

const SOCKET: Token = Token(0);
const WAKE: Token = Token(1);

/// One server connection: a nonblocking socket, its poll, and the shutdown signal.
#[derive(Debug)]
pub(crate) struct ServerConn<'s> {
    socket: Socket,
    poll: Poll,
    events: Events,
    shutdown: &'s ShutdownSignal,
    /// Deadline for every wait, set during the handshake.
    pub(crate) deadline: Option<Instant>,
    grace: Duration,
    grace_deadline: Option<Instant>,
}

impl<'s> ServerConn<'s> {
    pub(crate) fn new(
        socket: Socket,
        shutdown: &'s ShutdownSignal,
        grace: Duration,
    ) -> io::Result<ServerConn<'s>> {
        ServerConn::with_interest(
            socket,
            shutdown,
            grace,
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// A connection for replies only, on a second descriptor of the same socket with its own
    /// poll, so that reply writers and the request reader never wait on each other. Closing
    /// either closes the socket for both.
    pub(crate) fn writer(&self) -> io::Result<ServerConn<'s>> {
        let socket = self.socket.try_clone()?;
        ServerConn::with_interest(socket, self.shutdown, self.grace, Interest::WRITABLE)
    }

    fn with_interest(
        socket: Socket,
        shutdown: &'s ShutdownSignal,
        grace: Duration,
        interest: Interest,
    ) -> io::Result<ServerConn<'s>> {
        socket.set_nonblocking(true)?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut SourceFd(&socket.as_raw_fd()), SOCKET, interest)?;
        shutdown.watch(&poll, WAKE)?;
        Ok(ServerConn {
            socket,
            poll,
            events: Events::with_capacity(4),
            shutdown,
            deadline: None,
            grace,
            grace_deadline: None,
        })
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.is_raised()
    }

    /// Reads the first message of an exchange (a header). Returns `Closed` if the peer closed
    /// before sending a byte, and `ShutDown` if the server is shutting down and no byte is
    /// waiting; once a byte has arrived the rest is read as [`read_exact`](Self::read_exact).
    pub(crate) fn read_message(&mut self, buf: &mut [u8]) -> Result<(), ConnError> {
        self.read_into(buf, true)
    }

    /// Reads exactly `buf.len()` bytes in the middle of a message.
    pub(crate) fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ConnError> {
        self.read_into(buf, false)
    }

    fn read_into(&mut self, buf: &mut [u8], at_boundary: bool) -> Result<(), ConnError> {
        let mut done = 0;
        while done < buf.len() {
            match self.socket.read(&mut buf[done..]) {
                Ok(0) if done == 0 && at_boundary => return Err(ConnError::Closed),
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(at_boundary && done == 0)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if at_boundary && done == 0 && is_reset(&e) => {
                    return Err(ConnError::Closed);
                }
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        Ok(())
    }

    /// Writes all of `buf`.
    pub(crate) fn write_all(&mut self, buf: &[u8]) -> Result<(), ConnError> {
        let mut done = 0;
        while done < buf.len() {
            match self.socket.write(&buf[done..]) {
                Ok(0) => return Err(ConnError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(false)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        Ok(())
    }

    /// Closes both directions, so that the peer sees the end at once.
    pub(crate) fn close(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    /// Sleeps until the socket or the shutdown pipe has news, or a deadline passes. At a message
    /// boundary a shutdown ends the wait with `ShutDown`; inside a message the peer gets the
    /// grace period to finish it.
    fn wait(&mut self, at_boundary: bool) -> Result<(), ConnError> {
        loop {
            let now = Instant::now();
            let mut limit = self.deadline;
            if self.shutdown.is_raised() {
                if at_boundary {
                    return Err(ConnError::ShutDown);
                }
                let grace = *self.grace_deadline.get_or_insert(now + self.grace);
                limit = Some(limit.map_or(grace, |d| d.min(grace)));
            }
            let timeout = match limit {
                Some(l) if l <= now => return Err(ConnError::TimedOut),
                Some(l) => Some(l - now),
                None => None,
            };
            match self.poll.poll(&mut self.events, timeout) {
                // Readiness, a wake-up or a timeout: the caller retries its I/O, and a passed
                // deadline is noticed on the next wait.
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
    )
}
