//! A small blocking NBD client: fixed newstyle handshake with `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME`), then one request at a time with simple replies.
//!
//! It is what `xenvirtio-frontend verify --nbd` uses inside guests that have no qemu-io, and
//! what the tests use. It owns one connection. It never trusts the server: every reply is
//! checked (magic, handle, lengths), and a server that breaks the protocol ends the connection
//! with an error instead of being believed. Requests are split to honour the server's block
//! size constraints, and checked against the export's size and flags before they are sent.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::conn::Socket;
use super::proto::{self, BlockSizes, OptionHeader, OptionReplyHeader, Request, SimpleReply};

/// The largest option reply the client reads (a description is at most 4096 bytes).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Option replies accepted for one option (INFO items, LIST entries).
const MAX_OPTION_REPLIES: usize = 4096;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddress::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    /// The connection failed.
    #[error("NBD connection I/O failed")]
    Io(#[from] io::Error),
    /// The server does not speak the newstyle handshake.
    #[error("not a newstyle NBD server: {0}")]
    Handshake(String),
    /// The server has no export of that name.
    #[error("the server has no export named {name:?}: {message}")]
    UnknownExport {
        /// The name asked for.
        name: String,
        /// The server's message, if any.
        message: String,
    },
    /// The server refused an option.
    #[error("the server refused option {option} with {}: {message}", proto::reply_name(*.reply))]
    OptionRefused {
        /// The option.
        option: u32,
        /// The error reply type.
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server broke the protocol; the connection is closed.
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    /// The server answered a request with an error.
    #[error(
        "{} of {length} bytes at offset {offset} failed on the server: {} ({error})",
        proto::command_name(*.command), proto::errno_name(*.error)
    )]
    Command {
        /// The command.
        command: u16,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u32,
        /// The NBD error value.
        error: u32,
    },
    /// The request does not fit the export (range, alignment).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The export does not offer the operation.
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
    /// The server is shutting down; the client has disconnected.
    #[error("the NBD server is shutting down")]
    ShutDown,
    /// The connection was closed earlier (by `disconnect`, a shutdown or a protocol error).
    #[error("the NBD connection is closed")]
    Closed,
}

type Result<T> = std::result::Result<T, NbdClientError>;

/// What the handshake learnt about the export.
#[derive(Debug, Clone, Copy)]
struct ExportInfo {
    size: u64,
    flags: u16,
    block_sizes: BlockSizes,
}

/// A connected NBD client in the transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    socket: Socket,
    export_name: String,
    info: ExportInfo,
    next_handle: u64,
    open: bool,
}

impl NbdClient {
    /// Connects to `address` and opens `export_name` (`""` for the default export).
    pub fn connect(address: &NbdAddress, export_name: &str) -> Result<NbdClient> {
        match address {
            NbdAddress::Unix(path) => NbdClient::connect_unix(path, export_name),
            NbdAddress::Tcp(addr) => NbdClient::connect_tcp(*addr, export_name),
        }
    }

    /// Connects over a unix socket.
    pub fn connect_unix(path: impl AsRef<std::path::Path>, export_name: &str) -> Result<NbdClient> {
        let socket = Socket::Unix(UnixStream::connect(path)?);
        NbdClient::handshake(socket, export_name)
    }

    /// Connects over TCP.
    pub fn connect_tcp(addr: SocketAddr, export_name: &str) -> Result<NbdClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        NbdClient::handshake(Socket::Tcp(stream), export_name)
    }

    /// Lists the server's exports as (name, description) pairs with `NBD_OPT_LIST`, then ends
    /// the session with `NBD_OPT_ABORT`.
    pub fn list_exports(address: &NbdAddress) -> Result<Vec<(String, String)>> {
        let mut socket = match address {
            NbdAddress::Unix(path) => Socket::Unix(UnixStream::connect(path)?),
            NbdAddress::Tcp(addr) => Socket::Tcp(TcpStream::connect(addr)?),
        };
        let (fixed, _) = greet(&mut socket)?;
        if !fixed {
            return Err(NbdClientError::Handshake(
                "the server cannot list exports".to_owned(),
            ));
        }
        send_option(&mut socket, proto::OPT_LIST, &[])?;
        let mut exports = Vec::new();
        for _ in 0..MAX_OPTION_REPLIES {
            let (reply, data) = read_option_reply(&mut socket, proto::OPT_LIST)?;
            match reply {
                proto::REP_SERVER => {
                    let name_len = data
                        .get(0..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .filter(|&n| n <= data.len() - 4)
                        .ok_or_else(|| protocol("a SERVER reply with a bad name length"))?;
                    let name = String::from_utf8_lossy(&data[4..4 + name_len]).into_owned();
                    let description = String::from_utf8_lossy(&data[4 + name_len..]).into_owned();
                    exports.push((name, description));
                }
                proto::REP_ACK => {
                    abort(&mut socket);
                    return Ok(exports);
                }
                r if r & proto::REP_FLAG_ERROR != 0 => {
                    abort(&mut socket);
                    return Err(refused(proto::OPT_LIST, r, &data));
                }
                r => return Err(protocol(format!("reply {r} to LIST"))),
            }
        }
        Err(protocol("too many LIST replies"))
    }

    fn handshake(mut socket: Socket, export_name: &str) -> Result<NbdClient> {
        if export_name.len() > proto::MAX_STRING_LEN {
            return Err(NbdClientError::InvalidRequest(
                "export name over 4096 bytes".to_owned(),
            ));
        }
        let (fixed, no_zeroes) = greet(&mut socket)?;
        let info = match fixed {
            true => match go(&mut socket, export_name)? {
                Some(info) => info,
                // "clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP by falling back
                // to using NBD_OPT_EXPORT_NAME"
                None => export_name_option(&mut socket, export_name, no_zeroes)?,
            },
            false => export_name_option(&mut socket, export_name, no_zeroes)?,
        };
        if info.flags & proto::FLAG_HAS_FLAGS == 0 {
            return Err(protocol("transmission flags without NBD_FLAG_HAS_FLAGS"));
        }
        info.block_sizes
            .check(info.size)
            .map_err(|why| protocol(format!("block sizes: {why}")))?;
        Ok(NbdClient {
            socket,
            export_name: export_name.to_owned(),
            info,
            next_handle: 1,
            open: true,
        })
    }

    /// Sets a timeout on every later socket read and write (`None`: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        Ok(self.socket.set_timeouts(timeout)?)
    }

    /// The export name this client opened.
    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The transmission flags (`proto::FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.info.flags
    }

    /// The block size constraints (the protocol's defaults if the server sent none).
    pub fn block_sizes(&self) -> BlockSizes {
        self.info.block_sizes
    }

    /// Whether the export is read-only.
    pub fn read_only(&self) -> bool {
        self.has(proto::FLAG_READ_ONLY)
    }

    /// Whether the server takes FLUSH (and FUA).
    pub fn can_flush(&self) -> bool {
        self.has(proto::FLAG_SEND_FLUSH)
    }

    /// Whether the server takes TRIM.
    pub fn can_trim(&self) -> bool {
        self.has(proto::FLAG_SEND_TRIM)
    }

    /// Whether the server takes WRITE_ZEROES.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(proto::FLAG_SEND_WRITE_ZEROES)
    }

    /// Whether the server allows several connections with a shared view.
    pub fn can_multi_conn(&self) -> bool {
        self.has(proto::FLAG_CAN_MULTI_CONN)
    }

    fn has(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    /// Reads `buf.len()` bytes at `offset`, in requests no larger than the maximum block size.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("READ", offset, buf.len() as u64)?;
        let max = self.chunk_limit() as usize;
        for (i, chunk) in buf.chunks_mut(max).enumerate() {
            let at = offset + (i * max) as u64;
            self.request(proto::CMD_READ, 0, at, chunk.len() as u32, &[], chunk)?;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(buf, offset, 0)
    }

    /// Writes `buf` at `offset` with `NBD_CMD_FLAG_FUA`: each reply waits for stable storage.
    pub fn write_at_fua(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.has(proto::FLAG_SEND_FUA) {
            return Err(NbdClientError::Unsupported("FUA"));
        }
        self.write_with(buf, offset, proto::CMD_FLAG_FUA)
    }

    fn write_with(&mut self, buf: &[u8], offset: u64, flags: u16) -> Result<()> {
        self.writable("WRITE")?;
        self.check_range("WRITE", offset, buf.len() as u64)?;
        let max = self.chunk_limit() as usize;
        for (i, chunk) in buf.chunks(max).enumerate() {
            let at = offset + (i * max) as u64;
            self.request(
                proto::CMD_WRITE,
                flags,
                at,
                chunk.len() as u32,
                chunk,
                &mut [],
            )?;
        }
        Ok(())
    }

    /// Makes every completed write stable.
    pub fn flush(&mut self) -> Result<()> {
        if !self.can_flush() {
            return Err(NbdClientError::Unsupported("FLUSH"));
        }
        self.request(proto::CMD_FLUSH, 0, 0, 0, &[], &mut [])
    }

    /// Discards `len` bytes at `offset` (a hint; the contents become unspecified).
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<()> {
        self.writable("TRIM")?;
        if !self.can_trim() {
            return Err(NbdClientError::Unsupported("TRIM"));
        }
        self.check_range("TRIM", offset, len)?;
        // TRIM is not bound by the maximum block size, only by the 32-bit length field.
        let max = u64::from(u32::MAX) / u64::from(self.info.block_sizes.minimum)
            * u64::from(self.info.block_sizes.minimum);
        self.split(offset, len, max, |c, at, n| {
            c.request(proto::CMD_TRIM, 0, at, n, &[], &mut [])
        })
    }

    /// Makes `len` bytes at `offset` read as zeroes; `no_hole` asks the server to keep them
    /// allocated (`NBD_CMD_FLAG_NO_HOLE`).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, no_hole: bool) -> Result<()> {
        self.writable("WRITE_ZEROES")?;
        if !self.can_write_zeroes() {
            return Err(NbdClientError::Unsupported("WRITE_ZEROES"));
        }
        self.check_range("WRITE_ZEROES", offset, len)?;
        let flags = if no_hole { proto::CMD_FLAG_NO_HOLE } else { 0 };
        let max = u64::from(self.chunk_limit());
        self.split(offset, len, max, |c, at, n| {
            c.request(proto::CMD_WRITE_ZEROES, flags, at, n, &[], &mut [])
        })
    }

    /// Hands over the socket in the transmission phase, with no request outstanding, for
    /// another client to speak on (the kernel's NBD driver): no `NBD_CMD_DISC` is sent.
    /// The descriptor returned is a duplicate; this client's own is closed, which leaves the
    /// connection open.
    pub fn into_socket(mut self) -> Result<std::os::fd::OwnedFd> {
        self.open = false;
        Ok(match &self.socket {
            Socket::Unix(s) => s.try_clone()?.into(),
            Socket::Tcp(s) => s.try_clone()?.into(),
        })
    }

    /// Ends the session cleanly with `NBD_CMD_DISC`.
    pub fn disconnect(mut self) -> Result<()> {
        self.send_disc()
    }

    fn send_disc(&mut self) -> Result<()> {
        if !self.open {
            return Err(NbdClientError::Closed);
        }
        self.open = false;
        let handle = self.take_handle();
        let disc = Request {
            flags: 0,
            command: proto::CMD_DISC,
            handle,
            offset: 0,
            length: 0,
        };
        self.socket.write_all(&disc.encode())?;
        // Nothing may follow DISC; closing our side lets the server see the end at once.
        let _ = self.socket.shutdown(std::net::Shutdown::Write);
        Ok(())
    }

    fn take_handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        h
    }

    /// The largest READ/WRITE/WRITE_ZEROES length, rounded down to the minimum block size.
    fn chunk_limit(&self) -> u32 {
        let s = self.info.block_sizes;
        let max = s.maximum.min(proto::DEFAULT_MAX_PAYLOAD);
        (max / s.minimum * s.minimum).max(s.minimum)
    }

    fn writable(&self, what: &'static str) -> Result<()> {
        if self.read_only() {
            return Err(NbdClientError::InvalidRequest(format!(
                "{what} on a read-only export"
            )));
        }
        Ok(())
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        let min = u64::from(self.info.block_sizes.minimum);
        if offset % min != 0 || len % min != 0 {
            return Err(NbdClientError::InvalidRequest(format!(
                "{what} of {len} bytes at {offset} is not aligned to the export's {min}-byte blocks"
            )));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.info.size)
        {
            return Err(NbdClientError::InvalidRequest(format!(
                "{what} of {len} bytes at {offset} runs past the export's end ({} bytes)",
                self.info.size
            )));
        }
        Ok(())
    }

    fn split(
        &mut self,
        offset: u64,
        len: u64,
        max: u64,
        mut each: impl FnMut(&mut NbdClient, u64, u32) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            each(self, offset + done, n as u32)?;
            done += n;
        }
        Ok(())
    }

    /// Sends one request and reads its reply; `payload` follows a WRITE, `data` receives a
    /// READ's data.
    fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        data: &mut [u8],
    ) -> Result<()> {
        if !self.open {
            return Err(NbdClientError::Closed);
        }
        let handle = self.take_handle();
        let request = Request {
            flags,
            command,
            handle,
            offset,
            length,
        };
        let result = self.exchange(&request, payload, data);
        match result {
            Ok(0) => Ok(()),
            Ok(proto::ESHUTDOWN) => {
                // "If the client receives an NBD_ESHUTDOWN error it MUST initiate a soft
                // disconnect."
                let _ = self.send_disc();
                Err(NbdClientError::ShutDown)
            }
            Ok(error) => Err(NbdClientError::Command {
                command,
                offset,
                length,
                error,
            }),
            Err(e) => {
                // After an I/O or protocol failure the stream cannot be trusted.
                self.open = false;
                let _ = self.socket.shutdown(std::net::Shutdown::Both);
                Err(e)
            }
        }
    }

    /// Returns the reply's error value.
    fn exchange(&mut self, request: &Request, payload: &[u8], data: &mut [u8]) -> Result<u32> {
        self.socket.write_all(&request.encode())?;
        if !payload.is_empty() {
            self.socket.write_all(payload)?;
        }
        let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
        self.socket.read_exact(&mut header)?;
        let reply = SimpleReply::decode(&header).map_err(|magic| {
            if magic == proto::STRUCTURED_REPLY_MAGIC {
                protocol("a structured reply, which was never negotiated")
            } else {
                protocol(format!("reply magic {magic:#010x}"))
            }
        })?;
        if reply.handle != request.handle {
            return Err(protocol(format!(
                "reply for handle {} while {} was outstanding",
                reply.handle, request.handle
            )));
        }
        if reply.error == 0 && !data.is_empty() {
            self.socket.read_exact(data)?;
        }
        Ok(reply.error)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if self.open {
            let _ = self.send_disc();
        }
    }
}

fn protocol(what: impl Into<String>) -> NbdClientError {
    NbdClientError::Protocol(what.into())
}

fn refused(option: u32, reply: u32, data: &[u8]) -> NbdClientError {
    let message = String::from_utf8_lossy(data).into_owned();
    match reply {
        proto::REP_ERR_SHUTDOWN => NbdClientError::ShutDown,
        _ => NbdClientError::OptionRefused {
            option,
            reply,
            message,
        },
    }
}

/// Reads the server's greeting and sends the client flags; returns whether the server speaks
/// fixed newstyle and whether the zeroes after EXPORT_NAME are skipped.
fn greet(socket: &mut Socket) -> Result<(bool, bool)> {
    let mut hello = [0u8; 18];
    socket.read_exact(&mut hello[..16])?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().expect("8 bytes"));
    if magic != proto::NBDMAGIC {
        return Err(NbdClientError::Handshake(format!(
            "magic {magic:#018x} is not NBDMAGIC"
        )));
    }
    let second = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    match second {
        proto::IHAVEOPT => {}
        proto::OLDSTYLE_MAGIC => {
            return Err(NbdClientError::Handshake(
                "oldstyle negotiation is not supported".into(),
            ));
        }
        other => {
            return Err(NbdClientError::Handshake(format!(
                "second magic {other:#018x}"
            )));
        }
    }
    socket.read_exact(&mut hello[16..18])?;
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    let fixed = server_flags & proto::FLAG_FIXED_NEWSTYLE != 0;
    let mut client_flags = 0;
    if fixed {
        client_flags |= proto::FLAG_C_FIXED_NEWSTYLE;
    }
    // Zeroes are skipped only where they would follow EXPORT_NAME; GO never sends them.
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    socket.write_all(&client_flags.to_be_bytes())?;
    Ok((fixed, no_zeroes))
}

fn send_option(socket: &mut Socket, option: u32, data: &[u8]) -> Result<()> {
    let length = u32::try_from(data.len()).map_err(|_| protocol("option data too long"))?;
    let mut message = OptionHeader { option, length }.encode().to_vec();
    message.extend_from_slice(data);
    socket.write_all(&message)?;
    Ok(())
}

fn read_option_reply(socket: &mut Socket, option: u32) -> Result<(u32, Vec<u8>)> {
    let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    socket.read_exact(&mut header)?;
    let header = OptionReplyHeader::decode(&header)
        .map_err(|magic| protocol(format!("option reply magic {magic:#018x}")))?;
    if header.option != option {
        return Err(protocol(format!(
            "reply to option {} while {option} was sent",
            header.option
        )));
    }
    if header.length > MAX_OPTION_REPLY {
        return Err(protocol(format!(
            "an option reply of {} bytes",
            header.length
        )));
    }
    let mut data = vec![0u8; header.length as usize];
    socket.read_exact(&mut data)?;
    Ok((header.reply, data))
}

/// Soft disconnect during the handshake; the server may close without replying.
fn abort(socket: &mut Socket) {
    if send_option(socket, proto::OPT_ABORT, &[]).is_ok() {
        let _ = read_option_reply(socket, proto::OPT_ABORT);
    }
}

/// `NBD_OPT_GO` asking for the block size constraints; `None` if the server does not know GO.
fn go(socket: &mut Socket, name: &str) -> Result<Option<ExportInfo>> {
    let mut data = Vec::with_capacity(4 + name.len() + 4);
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    send_option(socket, proto::OPT_GO, &data)?;

    let mut export: Option<(u64, u16)> = None;
    let mut block_sizes = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let (reply, data) = read_option_reply(socket, proto::OPT_GO)?;
        match reply {
            proto::REP_INFO => {
                let Some(kind) = data.get(0..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
                    return Err(protocol("an INFO reply without a type"));
                };
                match kind {
                    proto::INFO_EXPORT => {
                        let Ok(b) = <[u8; 12]>::try_from(data.as_slice()) else {
                            return Err(protocol("NBD_INFO_EXPORT is not 12 bytes"));
                        };
                        let size = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
                        export = Some((size, u16::from_be_bytes([b[10], b[11]])));
                    }
                    proto::INFO_BLOCK_SIZE => {
                        let Ok(b) = <[u8; 14]>::try_from(data.as_slice()) else {
                            return Err(protocol("NBD_INFO_BLOCK_SIZE is not 14 bytes"));
                        };
                        let be =
                            |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4"));
                        block_sizes = Some(BlockSizes {
                            minimum: be(2),
                            preferred: be(6),
                            maximum: be(10),
                        });
                    }
                    // "The client MUST ignore information replies it does not understand."
                    _ => {}
                }
            }
            proto::REP_ACK => {
                let (size, flags) =
                    export.ok_or_else(|| protocol("GO succeeded without NBD_INFO_EXPORT"))?;
                let block_sizes = block_sizes.unwrap_or(BlockSizes::DEFAULT);
                return Ok(Some(ExportInfo {
                    size,
                    flags,
                    block_sizes,
                }));
            }
            proto::REP_ERR_UNSUP => return Ok(None),
            proto::REP_ERR_UNKNOWN => {
                abort(socket);
                return Err(NbdClientError::UnknownExport {
                    name: name.to_owned(),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            r if r & proto::REP_FLAG_ERROR != 0 => {
                abort(socket);
                return Err(refused(proto::OPT_GO, r, &data));
            }
            r => return Err(protocol(format!("reply {r} to GO"))),
        }
    }
    Err(protocol("too many GO replies"))
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags, or closes the connection.
fn export_name_option(socket: &mut Socket, name: &str, no_zeroes: bool) -> Result<ExportInfo> {
    send_option(socket, proto::OPT_EXPORT_NAME, name.as_bytes())?;
    let mut reply = [0u8; 10 + proto::EXPORT_NAME_PADDING];
    let len = if no_zeroes { 10 } else { reply.len() };
    match socket.read_exact(&mut reply[..len]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(NbdClientError::UnknownExport {
                name: name.to_owned(),
                message: "the server closed the connection at EXPORT_NAME".to_owned(),
            });
        }
        Err(e) => return Err(e.into()),
    }
    let size = u64::from_be_bytes(reply[0..8].try_into().expect("8 bytes"));
    let flags = u16::from_be_bytes([reply[8], reply[9]]);
    Ok(ExportInfo {
        size,
        flags,
        block_sizes: BlockSizes::DEFAULT,
    })
}
