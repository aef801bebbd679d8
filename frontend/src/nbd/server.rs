//! The long-running NBD server: listeners, the accept thread, one thread per connection, and
//! graceful shutdown.
//!
//! The server owns its listening sockets (a unix socket, and optionally loopback TCP) and the
//! threads it starts. It serves successive and concurrent clients of one export until it is
//! shut down; a client that disconnects abruptly or speaks garbage ends only its own
//! connection. It never listens on anything but loopback, never replaces a file that is not a
//! stale socket, and never removes a socket file that another server has since bound.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::conn::{ServerConn, ShutdownSignal, Socket};
use super::export::BlockExport;
use super::proto::{self, BlockSizes};
use super::session::{Session, SessionEnd};

/// The default cap on a READ or WRITE (and WRITE_ZEROES) length, advertised as the maximum
/// block size: 32 MiB, the largest request the protocol says a client may expect to work.
pub const DEFAULT_MAX_REQUEST: u32 = proto::DEFAULT_MAX_PAYLOAD;

/// Configuration of one export's server.
#[derive(Debug, Clone)]
pub struct NbdServerConfig {
    /// The export's name (for example `xvda` or the device id); the default export `""` is
    /// the same export. At most 4096 bytes, no NUL.
    pub export_name: String,
    /// A description for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Path of the unix socket to listen on.
    pub unix_socket: Option<PathBuf>,
    /// Permissions of the unix socket file (connecting needs write permission).
    pub unix_socket_mode: u32,
    /// Loopback TCP address to listen on (`127.0.0.1:port` or `[::1]:port`; port 0 picks one).
    pub tcp: Option<SocketAddr>,
    /// Cap on a READ, WRITE or WRITE_ZEROES length, advertised as the maximum block size; a
    /// multiple of the export's block size.
    pub max_request: u32,
    /// Connections served at once; further ones are closed at accept.
    pub max_connections: usize,
    /// Requests one connection may have in flight (served at once, replied as each
    /// completes); 1 serves requests one at a time, in order. Their payload and data are also
    /// bounded, at 8 MiB per connection.
    pub max_in_flight: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// After a shutdown, time a client has to finish a message it has started, and to take
    /// its replies.
    pub shutdown_grace: Duration,
}

impl NbdServerConfig {
    /// A configuration for `export_name` with no listener yet and the defaults: socket mode
    /// 0600, requests up to 32 MiB, 64 connections, 32 requests in flight per connection, a
    /// 10 s handshake, a 5 s shutdown grace.
    pub fn new(export_name: impl Into<String>) -> NbdServerConfig {
        NbdServerConfig {
            export_name: export_name.into(),
            description: None,
            unix_socket: None,
            unix_socket_mode: 0o600,
            tcp: None,
            max_request: DEFAULT_MAX_REQUEST,
            max_connections: 64,
            max_in_flight: 32,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }

    /// Listens on the unix socket `path`.
    pub fn unix(mut self, path: impl Into<PathBuf>) -> NbdServerConfig {
        self.unix_socket = Some(path.into());
        self
    }

    /// Listens on the loopback TCP address `addr`.
    pub fn tcp(mut self, addr: SocketAddr) -> NbdServerConfig {
        self.tcp = Some(addr);
        self
    }
}

/// Errors of starting an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdServerError {
    /// The configuration or the export's geometry breaks a rule of the protocol.
    #[error("invalid NBD export configuration: {0}")]
    Config(String),
    /// Neither a unix socket nor a TCP address was given.
    #[error("no listener configured: give a unix socket path or a loopback TCP address")]
    NoListener,
    /// The TCP address is not a loopback address.
    #[error("{0} is not a loopback address; the NBD export listens on 127.0.0.1 or ::1 only")]
    NotLoopback(SocketAddr),
    /// A live server already listens on the unix socket path.
    #[error("another server is listening on {}", .0.display())]
    SocketInUse(PathBuf),
    /// The unix socket path exists and is not a socket.
    #[error("refusing to replace {}: it is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Binding or configuring a listener failed.
    #[error("cannot listen on {what}")]
    Listen {
        /// The path or address.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The poll or the accept thread could not be set up.
    #[error("cannot start the NBD server")]
    Start(#[source] io::Error),
}

/// A snapshot of a server's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// Connections accepted and served.
    pub connections_accepted: u64,
    /// Connections closed at accept because `max_connections` were being served.
    pub connections_refused: u64,
    /// Connections being served now.
    pub connections_active: u64,
    /// Transmission requests received (DISC included).
    pub requests: u64,
    /// Requests answered with an error.
    pub request_errors: u64,
    /// Connections ended for breaking the protocol.
    pub protocol_errors: u64,
    /// Bytes read from the device for clients.
    pub bytes_read: u64,
    /// Bytes written to the device for clients.
    pub bytes_written: u64,
}

/// The live counters behind [`NbdStats`].
#[derive(Debug, Default)]
pub(crate) struct StatCounters {
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) request_errors: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
}

impl StatCounters {
    fn snapshot(&self) -> NbdStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NbdStats {
            connections_accepted: get(&self.connections_accepted),
            connections_refused: get(&self.connections_refused),
            connections_active: get(&self.connections_active),
            requests: get(&self.requests),
            request_errors: get(&self.request_errors),
            protocol_errors: get(&self.protocol_errors),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
        }
    }
}

/// What every session needs to know about the export, fixed at start.
#[derive(Debug)]
pub(crate) struct ExportSettings {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) block_sizes: BlockSizes,
    pub(crate) handshake_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    pub(crate) max_in_flight: usize,
}

impl ExportSettings {
    /// Whether a client's export name designates this export (its name, or the default `""`).
    pub(crate) fn names(&self, requested: &[u8]) -> bool {
        requested.is_empty() || requested == self.name.as_bytes()
    }
}

/// State shared by the accept thread, the sessions and the handles.
struct Shared {
    export: Arc<dyn BlockExport>,
    settings: ExportSettings,
    stats: StatCounters,
    shutdown: ShutdownSignal,
    max_connections: usize,
}

/// Raises a server's shutdown from anywhere (another thread, a signal-handling thread).
#[derive(Clone)]
pub struct ShutdownTrigger(Arc<Shared>);

impl ShutdownTrigger {
    /// Starts a graceful shutdown: the server stops listening, requests in flight finish, and
    /// requests that arrive afterwards are answered `NBD_ESHUTDOWN`.
    pub fn trigger(&self) {
        self.0.shutdown.raise();
    }

    /// Whether the shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        self.0.shutdown.is_raised()
    }
}

impl std::fmt::Debug for ShutdownTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ShutdownTrigger")
            .field(&self.0.settings.name)
            .finish()
    }
}

/// An NBD server exporting one [`BlockExport`]; it runs until [`shutdown`](Self::shutdown)
/// (or drop).
pub struct NbdServer {
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
    unix_socket: Option<PathBuf>,
    tcp_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("export", &self.shared.settings.name)
            .field("unix_socket", &self.unix_socket)
            .field("tcp_addr", &self.tcp_addr)
            .finish_non_exhaustive()
    }
}

const WAKE: Token = Token(0);
const UNIX_LISTENER: Token = Token(1);
const TCP_LISTENER: Token = Token(2);

impl NbdServer {
    /// Checks the configuration against the export, binds the listeners and starts serving.
    pub fn start(
        export: Arc<dyn BlockExport>,
        config: NbdServerConfig,
    ) -> Result<NbdServer, NbdServerError> {
        let settings = settings(export.as_ref(), &config)?;
        if config.unix_socket.is_none() && config.tcp.is_none() {
            return Err(NbdServerError::NoListener);
        }
        if config.max_connections == 0 {
            return Err(NbdServerError::Config("max_connections is 0".to_owned()));
        }
        let tcp = match config.tcp {
            Some(addr) if !addr.ip().is_loopback() => {
                return Err(NbdServerError::NotLoopback(addr));
            }
            Some(addr) => Some(bind_tcp(addr)?),
            None => None,
        };
        let tcp_addr = tcp
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()
            .map_err(|e| NbdServerError::Listen {
                what: "the TCP listener".to_owned(),
                source: e,
            })?;
        let unix = match &config.unix_socket {
            Some(path) => Some(bind_unix(path, config.unix_socket_mode)?),
            None => None,
        };
        let unix_socket = unix.as_ref().map(|u| u.path.clone());

        let shared = Arc::new(Shared {
            export,
            settings,
            stats: StatCounters::default(),
            shutdown: ShutdownSignal::new().map_err(NbdServerError::Start)?,
            max_connections: config.max_connections,
        });
        let poll = Poll::new().map_err(NbdServerError::Start)?;
        shared
            .shutdown
            .watch(&poll, WAKE)
            .map_err(NbdServerError::Start)?;
        if let Some(u) = &unix {
            let fd = u.listener.as_raw_fd();
            poll.registry()
                .register(&mut SourceFd(&fd), UNIX_LISTENER, Interest::READABLE)
                .map_err(NbdServerError::Start)?;
        }
        if let Some(t) = &tcp {
            let fd = t.as_raw_fd();
            poll.registry()
                .register(&mut SourceFd(&fd), TCP_LISTENER, Interest::READABLE)
                .map_err(NbdServerError::Start)?;
        }
        let acceptor = Acceptor {
            shared: Arc::clone(&shared),
            poll,
            unix,
            tcp,
            sessions: Vec::new(),
        };
        let accept_thread = std::thread::Builder::new()
            .name(format!("nbd-accept-{}", shared.settings.name))
            .spawn(move || acceptor.run())
            .map_err(NbdServerError::Start)?;
        tracing::info!(
            export = %shared.settings.name,
            unix = ?unix_socket,
            tcp = ?tcp_addr,
            "NBD export listening"
        );
        Ok(NbdServer {
            shared,
            accept_thread: Some(accept_thread),
            unix_socket,
            tcp_addr,
        })
    }

    /// The unix socket the server listens on.
    pub fn unix_socket(&self) -> Option<&Path> {
        self.unix_socket.as_deref()
    }

    /// The TCP address the server listens on (with the port chosen if 0 was asked).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The export's name.
    pub fn export_name(&self) -> &str {
        &self.shared.settings.name
    }

    /// The counters now.
    pub fn stats(&self) -> NbdStats {
        self.shared.stats.snapshot()
    }

    /// A handle that triggers the shutdown from elsewhere.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger(Arc::clone(&self.shared))
    }

    /// Shuts down gracefully and waits: the listeners close (the socket file is removed),
    /// requests in flight finish, later requests get `NBD_ESHUTDOWN`, idle connections close.
    pub fn shutdown(mut self) {
        self.shared.shutdown.raise();
        self.join();
    }

    /// Waits until a [`ShutdownTrigger`] stops the server and every connection has ended.
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(thread) = self.accept_thread.take() {
            if thread.join().is_err() {
                tracing::error!(export = %self.shared.settings.name, "the NBD accept thread panicked");
            }
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shared.shutdown.raise();
        self.join();
    }
}

/// Checks the export's geometry and the configuration against "Block size constraints".
fn settings(
    export: &dyn BlockExport,
    config: &NbdServerConfig,
) -> Result<ExportSettings, NbdServerError> {
    let bad = |what: String| Err(NbdServerError::Config(what));
    let name = &config.export_name;
    if name.len() > proto::MAX_STRING_LEN || name.contains('\0') {
        return bad("the export name must be at most 4096 bytes without NUL".to_owned());
    }
    if let Some(d) = &config.description {
        // LIST carries name and description in one reply; keep both within the string limit.
        if d.len() + name.len() > proto::MAX_STRING_LEN || d.contains('\0') {
            return bad(
                "the description must fit 4096 bytes with the name, without NUL".to_owned(),
            );
        }
    }
    let block_sizes = BlockSizes {
        minimum: export.block_size(),
        preferred: export.preferred_block_size(),
        maximum: config.max_request,
    };
    if let Err(why) = block_sizes.check(export.size()) {
        return bad(format!(
            "{why} (minimum {}, preferred {}, maximum {})",
            block_sizes.minimum, block_sizes.preferred, block_sizes.maximum
        ));
    }
    if export.size() % u64::from(block_sizes.minimum) != 0 {
        // "the advertised export size SHOULD be an integer multiple of that block size, since
        // otherwise, the client would be unable to access the final few bytes".
        tracing::warn!(
            export = %name,
            size = export.size(),
            block_size = block_sizes.minimum,
            "the export size is not a multiple of its block size; the tail is unreachable"
        );
    }
    Ok(ExportSettings {
        name: name.clone(),
        description: config.description.clone(),
        block_sizes,
        handshake_timeout: config.handshake_timeout,
        shutdown_grace: config.shutdown_grace,
        max_in_flight: config.max_in_flight.max(1),
    })
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, NbdServerError> {
    let listen_error = |source| NbdServerError::Listen {
        what: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    Ok(listener)
}

/// A bound unix listener and the identity of its socket file, to remove only our own.
struct UnixSocketFile {
    listener: UnixListener,
    path: PathBuf,
    dev_ino: Option<(u64, u64)>,
}

impl UnixSocketFile {
    fn remove(&self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.dev_ino);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::debug!(path = %self.path.display(), error = %e, "removing the socket failed");
            }
        }
    }
}

fn bind_unix(path: &Path, mode: u32) -> Result<UnixSocketFile, NbdServerError> {
    let listen_error = |source| NbdServerError::Listen {
        what: path.display().to_string(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // Replace a stale socket left by a server that died, never a live one or a file.
            let meta = fs::symlink_metadata(path).map_err(listen_error)?;
            if !meta.file_type().is_socket() {
                return Err(NbdServerError::NotASocket(path.to_owned()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(NbdServerError::SocketInUse(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale NBD socket");
                    fs::remove_file(path).map_err(listen_error)?;
                    UnixListener::bind(path).map_err(listen_error)?
                }
                Err(e) => return Err(listen_error(e)),
            }
        }
        Err(e) => return Err(listen_error(e)),
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    let dev_ino = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
    Ok(UnixSocketFile {
        listener,
        path: path.to_owned(),
        dev_ino,
    })
}

/// The accept thread's state.
struct Acceptor {
    shared: Arc<Shared>,
    poll: Poll,
    unix: Option<UnixSocketFile>,
    tcp: Option<TcpListener>,
    sessions: Vec<JoinHandle<()>>,
}

impl Acceptor {
    fn run(mut self) {
        let mut events = Events::with_capacity(8);
        while !self.shared.shutdown.is_raised() {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(export = %self.shared.settings.name, error = %e, "NBD accept poll failed; stopping");
                self.shared.shutdown.raise();
                break;
            }
            for event in &events {
                match event.token() {
                    UNIX_LISTENER => self.accept_all(true),
                    TCP_LISTENER => self.accept_all(false),
                    _ => {}
                }
            }
            self.sessions.retain(|s| !s.is_finished());
        }
        // Stop listening first, so that new clients are refused while the others drain.
        if let Some(u) = self.unix.take() {
            u.remove();
        }
        self.tcp = None;
        let sessions = std::mem::take(&mut self.sessions);
        for session in sessions {
            if session.join().is_err() {
                tracing::error!(export = %self.shared.settings.name, "an NBD connection thread panicked");
            }
        }
        tracing::info!(export = %self.shared.settings.name, "NBD export stopped");
    }

    /// Accepts until the listener would block (the poll is edge-triggered).
    fn accept_all(&mut self, unix: bool) {
        loop {
            let accepted = if unix {
                match &self.unix {
                    Some(u) => u.listener.accept().map(|(s, _)| Socket::Unix(s)),
                    None => return,
                }
            } else {
                match &self.tcp {
                    Some(t) => t.accept().map(|(s, _)| {
                        // The protocol asks both ends to disable Nagle's algorithm.
                        let _ = s.set_nodelay(true);
                        Socket::Tcp(s)
                    }),
                    None => return,
                }
            };
            match accepted {
                Ok(socket) => self.serve(socket),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning; the pending
                    // connection stays queued for the next edge or retry.
                    tracing::warn!(export = %self.shared.settings.name, error = %e, "accepting an NBD connection failed");
                    std::thread::sleep(Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    fn serve(&mut self, socket: Socket) {
        let stats = &self.shared.stats;
        let active = stats.connections_active.load(Ordering::SeqCst);
        if active >= self.shared.max_connections as u64 {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(export = %self.shared.settings.name, active, "connection refused: too many clients");
            return;
        }
        stats.connections_active.fetch_add(1, Ordering::SeqCst);
        let id = stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&self.shared);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-{}-{id}", self.shared.settings.name))
            .spawn(move || {
                serve_connection(&shared, socket, id);
                shared
                    .stats
                    .connections_active
                    .fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(handle) => self.sessions.push(handle),
            Err(e) => {
                stats.connections_active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(export = %self.shared.settings.name, error = %e, "no thread for an NBD connection");
            }
        }
    }
}

fn serve_connection(shared: &Shared, socket: Socket, id: u64) {
    let span = tracing::debug_span!(
        "nbd",
        export = %shared.settings.name,
        conn = id,
        peer = %socket.peer()
    );
    let _entered = span.enter();
    let conn = match ServerConn::new(socket, &shared.shutdown, shared.settings.shutdown_grace) {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(error = %e, "setting up the connection failed");
            return;
        }
    };
    let session = Session::new(
        conn,
        shared.export.as_ref(),
        &shared.settings,
        &shared.stats,
    );
    match session.run() {
        Ok(SessionEnd::Disconnected) => tracing::debug!("client disconnected"),
        Ok(SessionEnd::ClientClosed) => tracing::debug!("client closed the connection"),
        Ok(SessionEnd::ShutDown) => tracing::debug!("connection closed for shutdown"),
        Err(e) => tracing::debug!(error = %error_chain(&e), "connection ended"),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
