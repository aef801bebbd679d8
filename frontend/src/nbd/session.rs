//! One NBD connection on the server side: the fixed newstyle handshake, then transmission.
//!
//! The session owns the protocol state of one client. Everything the client sends is hostile
//! until checked: option and request lengths are capped before anything is allocated, every
//! request is validated against the export's size, alignment and capabilities before the
//! device is touched, and a client that breaks the protocol loses only its own connection.
//! Requests are served one at a time, in order, with simple replies; a WRITE's payload and a
//! READ's data move through one bounded per-connection buffer, in chunks.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::conn::{ConnError, ServerConn};
use super::export::BlockExport;
use super::proto::{self, OptionHeader, OptionReplyHeader, Request, SimpleReply};
use super::server::{ExportSettings, StatCounters};

/// The largest option payload read from a client. `NBD_OPT_GO` with a 4096-byte name and a few
/// information requests fits many times; anything larger is treated as an attack and ends the
/// connection ("Termination of the session during option haggling": a server MAY hard-disconnect
/// a client whose behaviour it deems a denial of service).
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options accepted in one handshake before the client is deemed abusive.
const MAX_OPTIONS: usize = 1024;
/// Chunk in which READ data and WRITE payloads move between the socket and the device; the
/// per-connection buffer never grows beyond it (plus a reply header).
pub(crate) const IO_CHUNK: usize = 1 << 20;

/// How a session ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// `NBD_CMD_DISC` or `NBD_OPT_ABORT`: a soft disconnect.
    Disconnected,
    /// The client closed the connection between two messages.
    ClientClosed,
    /// The server shut down.
    ShutDown,
}

/// Why a session ended with an error; logged at debug level, never shown to other clients.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The socket failed or the client stalled.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The client broke a mandatory rule of the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The device failed after a successful READ reply header went out, which forces a hard
    /// disconnect ("Simple replies" under `NBD_CMD_READ`).
    #[error("the device failed in the middle of a READ reply")]
    ReadAfterHeader(#[source] io::Error),
}

/// What transmission uses from the handshake.
#[derive(Debug, Clone, Copy)]
struct Transmission {
    size: u64,
    flags: u16,
}

/// The server side of one connection.
pub(crate) struct Session<'a> {
    conn: ServerConn<'a>,
    export: &'a dyn BlockExport,
    settings: &'a ExportSettings,
    stats: &'a StatCounters,
    /// Reply header then data for READ, payload for WRITE; at most `16 + IO_CHUNK` bytes.
    buf: Vec<u8>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("export", &self.settings.name)
            .finish_non_exhaustive()
    }
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        conn: ServerConn<'a>,
        export: &'a dyn BlockExport,
        settings: &'a ExportSettings,
        stats: &'a StatCounters,
    ) -> Session<'a> {
        Session {
            conn,
            export,
            settings,
            stats,
            buf: Vec::new(),
        }
    }

    /// Runs the connection to its end, then closes the socket.
    pub(crate) fn run(mut self) -> Result<SessionEnd, SessionError> {
        let result = self.handshake_then_transmit();
        self.conn.close();
        match result {
            Err(SessionError::Conn(ConnError::Closed)) => Ok(SessionEnd::ClientClosed),
            Err(SessionError::Conn(ConnError::ShutDown)) => Ok(SessionEnd::ShutDown),
            other => other,
        }
    }

    fn handshake_then_transmit(&mut self) -> Result<SessionEnd, SessionError> {
        self.conn.deadline = Some(Instant::now() + self.settings.handshake_timeout);
        let Some(transmission) = self.handshake()? else {
            return Ok(SessionEnd::Disconnected);
        };
        self.conn.deadline = None;
        tracing::debug!(
            size = transmission.size,
            flags = transmission.flags,
            "transmission"
        );
        self.transmit(transmission)
    }

    // ---- Handshake ("Fixed newstyle negotiation") -------------------------------------------

    /// Returns `None` after `NBD_OPT_ABORT`.
    fn handshake(&mut self) -> Result<Option<Transmission>, SessionError> {
        let mut hello = [0u8; 18];
        hello[0..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
        hello[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
        let handshake_flags = proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES;
        hello[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
        self.conn.write_all(&hello)?;

        let mut client_flags = [0u8; 4];
        self.conn.read_message(&mut client_flags)?;
        let client_flags = u32::from_be_bytes(client_flags);
        // "Client flags": the server MUST drop the connection on an unknown flag.
        if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(self.violation(format!("unknown client flags {client_flags:#x}")));
        }
        let fixed = client_flags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;

        for _ in 0..MAX_OPTIONS {
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            self.conn.read_message(&mut header)?;
            let header = OptionHeader::decode(&header)
                .map_err(|magic| self.violation(format!("option magic {magic:#018x}")))?;
            if header.length > MAX_OPTION_LEN {
                return Err(self.violation(format!(
                    "option {} carries {} bytes, more than {MAX_OPTION_LEN}",
                    header.option, header.length
                )));
            }
            let mut data = vec![0u8; header.length as usize];
            self.conn.read_exact(&mut data)?;
            let option = header.option;
            tracing::trace!(option, len = data.len(), "option");

            // Without NBD_FLAG_C_FIXED_NEWSTYLE the client speaks plain newstyle, where
            // EXPORT_NAME is the only option and there are no option replies.
            if !fixed && option != proto::OPT_EXPORT_NAME {
                return Err(self.violation(format!(
                    "option {option} from a client that did not agree to fixed newstyle"
                )));
            }
            // "If the server is in the process of being shut down it ... SHOULD error further
            // options received (other than an NBD_OPT_ABORT) with NBD_REP_ERR_SHUTDOWN."
            if self.conn.shutting_down() && option != proto::OPT_ABORT {
                if option == proto::OPT_EXPORT_NAME {
                    return Err(ConnError::ShutDown.into());
                }
                self.option_error(
                    option,
                    proto::REP_ERR_SHUTDOWN,
                    "the server is shutting down",
                )?;
                continue;
            }
            match option {
                proto::OPT_EXPORT_NAME => {
                    if !self.settings.names(&data) {
                        // The option cannot fail; the server MUST terminate the session.
                        return Err(self.violation(format!(
                            "EXPORT_NAME for unknown export {:?}",
                            String::from_utf8_lossy(&data)
                        )));
                    }
                    let t = self.transmission();
                    let mut reply = Vec::with_capacity(10 + proto::EXPORT_NAME_PADDING);
                    reply.extend_from_slice(&t.size.to_be_bytes());
                    reply.extend_from_slice(&t.flags.to_be_bytes());
                    if !no_zeroes {
                        reply.resize(10 + proto::EXPORT_NAME_PADDING, 0);
                    }
                    self.conn.write_all(&reply)?;
                    return Ok(Some(t));
                }
                proto::OPT_ABORT => {
                    // The client may already be gone; the reply is a courtesy.
                    let _ = self.option_reply(option, proto::REP_ACK, &[]);
                    return Ok(None);
                }
                proto::OPT_LIST => {
                    if !data.is_empty() {
                        self.option_error(option, proto::REP_ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    let name = self.settings.name.as_bytes();
                    let mut server = Vec::with_capacity(4 + name.len());
                    server.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    server.extend_from_slice(name);
                    if let Some(description) = &self.settings.description {
                        server.extend_from_slice(description.as_bytes());
                    }
                    self.option_reply(option, proto::REP_SERVER, &server)?;
                    self.option_reply(option, proto::REP_ACK, &[])?;
                }
                proto::OPT_INFO | proto::OPT_GO => {
                    if let Some(t) = self.info_or_go(option, &data)? {
                        return Ok(Some(t));
                    }
                }
                // Structured replies, TLS, metadata contexts and anything newer are not
                // implemented: NBD_REP_ERR_UNSUP, and the session continues ("Baseline").
                _ => {
                    let message = format!("option {option} is not supported by this server");
                    self.option_error(option, proto::REP_ERR_UNSUP, &message)?;
                }
            }
        }
        Err(self.violation(format!("more than {MAX_OPTIONS} options")))
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`; returns the transmission parameters after a successful
    /// GO, `None` otherwise (the haggling continues).
    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Transmission>, SessionError> {
        let Some(request) = InfoRequest::parse(data) else {
            let message = "malformed request: name length, name, count, information types";
            self.option_error(option, proto::REP_ERR_INVALID, message)?;
            return Ok(None);
        };
        if !self.settings.names(request.name) {
            let message = format!(
                "no export named {:?}; this server exports {:?}",
                String::from_utf8_lossy(request.name),
                self.settings.name
            );
            self.option_error(option, proto::REP_ERR_UNKNOWN, &message)?;
            return Ok(None);
        }
        let t = self.transmission();
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&t.size.to_be_bytes());
        export.extend_from_slice(&t.flags.to_be_bytes());
        self.option_reply(option, proto::REP_INFO, &export)?;
        if request.wants(proto::INFO_NAME) {
            let name = self.settings.name.as_bytes();
            self.option_reply(
                option,
                proto::REP_INFO,
                &info_string(proto::INFO_NAME, name),
            )?;
        }
        if request.wants(proto::INFO_DESCRIPTION) {
            if let Some(d) = &self.settings.description {
                let info = info_string(proto::INFO_DESCRIPTION, d.as_bytes());
                self.option_reply(option, proto::REP_INFO, &info)?;
            }
        }
        // Sent whether asked or not (allowed: "The server MAY send information requests back
        // which are not explicitly requested"), since the constraints are enforced either way.
        let sizes = self.settings.block_sizes;
        let mut block = Vec::with_capacity(14);
        block.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        block.extend_from_slice(&sizes.minimum.to_be_bytes());
        block.extend_from_slice(&sizes.preferred.to_be_bytes());
        block.extend_from_slice(&sizes.maximum.to_be_bytes());
        self.option_reply(option, proto::REP_INFO, &block)?;
        self.option_reply(option, proto::REP_ACK, &[])?;
        Ok((option == proto::OPT_GO).then_some(t))
    }

    /// Size and transmission flags from the export's current state.
    fn transmission(&self) -> Transmission {
        let export = self.export;
        let read_only = export.read_only();
        let mut flags = proto::FLAG_HAS_FLAGS;
        if read_only {
            flags |= proto::FLAG_READ_ONLY;
        }
        if export.can_flush() {
            flags |= proto::FLAG_SEND_FLUSH;
            if !read_only {
                flags |= proto::FLAG_SEND_FUA;
            }
        }
        if !read_only && export.can_trim() {
            flags |= proto::FLAG_SEND_TRIM;
        }
        if !read_only && export.can_write_zeroes() {
            flags |= proto::FLAG_SEND_WRITE_ZEROES;
        }
        if export.can_multi_conn() {
            flags |= proto::FLAG_CAN_MULTI_CONN;
        }
        Transmission {
            size: export.size(),
            flags,
        }
    }

    fn option_reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Result<(), ConnError> {
        let length = u32::try_from(data.len()).expect("option replies are built from bounded data");
        let mut message = Vec::with_capacity(proto::OPTION_REPLY_HEADER_LEN + data.len());
        message.extend_from_slice(
            &OptionReplyHeader {
                option,
                reply,
                length,
            }
            .encode(),
        );
        message.extend_from_slice(data);
        self.conn.write_all(&message)
    }

    /// An error reply with a message for humans ("All error replies MAY have some data set").
    fn option_error(&mut self, option: u32, reply: u32, message: &str) -> Result<(), ConnError> {
        tracing::debug!(
            option,
            reply = proto::reply_name(reply),
            message,
            "option refused"
        );
        let message = truncate_utf8(message, proto::MAX_STRING_LEN);
        self.option_reply(option, reply, message.as_bytes())
    }

    fn violation(&self, what: String) -> SessionError {
        self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        SessionError::Protocol(what)
    }

    // ---- Transmission ----------------------------------------------------------------------

    fn transmit(&mut self, t: Transmission) -> Result<SessionEnd, SessionError> {
        loop {
            let mut header = [0u8; proto::REQUEST_LEN];
            self.conn.read_message(&mut header)?;
            let request = Request::decode(&header)
                .map_err(|magic| self.violation(format!("request magic {magic:#010x}")))?;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if request.command == proto::CMD_DISC {
                // Requests are served in order, so none is outstanding.
                return Ok(SessionEnd::Disconnected);
            }
            // "On a server shutdown ... The error value issued in respect of ... any
            // subsequently received requests SHOULD be NBD_ESHUTDOWN."
            if self.conn.shutting_down() {
                self.refuse(&request, proto::ESHUTDOWN)?;
                continue;
            }
            match self.check(&request, t) {
                Err(error) => self.refuse(&request, error)?,
                Ok(()) => self.execute(&request)?,
            }
        }
    }

    /// Validates a request before it touches the device; `Err` is the NBD error to reply
    /// ("Error values", "Block size constraints").
    fn check(&self, r: &Request, t: Transmission) -> Result<(), u32> {
        let writes = matches!(
            r.command,
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
        );
        if !writes && !matches!(r.command, proto::CMD_READ | proto::CMD_FLUSH) {
            return Err(proto::EINVAL); // unknown or unsupported command
        }
        if writes && t.flags & proto::FLAG_READ_ONLY != 0 {
            return Err(proto::EPERM);
        }
        let mut allowed = 0;
        if t.flags & proto::FLAG_SEND_FUA != 0 {
            allowed |= proto::CMD_FLAG_FUA; // valid on every command once negotiated
        }
        if r.command == proto::CMD_WRITE_ZEROES {
            allowed |= proto::CMD_FLAG_NO_HOLE;
        }
        if r.flags & !allowed != 0 {
            return Err(proto::EINVAL);
        }
        let advertised = match r.command {
            proto::CMD_FLUSH => proto::FLAG_SEND_FLUSH,
            proto::CMD_TRIM => proto::FLAG_SEND_TRIM,
            proto::CMD_WRITE_ZEROES => proto::FLAG_SEND_WRITE_ZEROES,
            _ => proto::FLAG_HAS_FLAGS,
        };
        if t.flags & advertised == 0 {
            return Err(proto::EINVAL);
        }
        if r.command == proto::CMD_FLUSH {
            // "For a flush request, length and offset are reserved, and MUST be set to
            // all-zero."
            return if r.offset == 0 && r.length == 0 {
                Ok(())
            } else {
                Err(proto::EINVAL)
            };
        }
        // TRIM is the one command whose length the maximum block size does not bound.
        if r.command != proto::CMD_TRIM && r.length > self.settings.block_sizes.maximum {
            return Err(proto::EINVAL);
        }
        let minimum = u64::from(self.settings.block_sizes.minimum);
        if r.offset % minimum != 0 || u64::from(r.length) % minimum != 0 {
            return Err(proto::EINVAL);
        }
        let in_range = r
            .offset
            .checked_add(u64::from(r.length))
            .is_some_and(|end| end <= t.size);
        if !in_range {
            // ENOSPC for writes past the end, EINVAL for reads and trims.
            return Err(match r.command {
                proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => proto::ENOSPC,
                _ => proto::EINVAL,
            });
        }
        Ok(())
    }

    /// Replies `error` to a request, first draining a WRITE's payload so that the stream stays
    /// in step (through the bounded buffer: a refused request allocates nothing new).
    fn refuse(&mut self, r: &Request, error: u32) -> Result<(), SessionError> {
        tracing::debug!(
            command = proto::command_name(r.command),
            flags = r.flags,
            offset = r.offset,
            length = r.length,
            error = proto::errno_name(error),
            "request refused"
        );
        if r.command == proto::CMD_WRITE {
            let mut left = r.length as usize;
            while left > 0 {
                let n = left.min(IO_CHUNK);
                self.ensure_buf(n);
                self.conn.read_exact(&mut self.buf[..n])?;
                left -= n;
            }
        }
        self.reply(r.handle, error)
    }

    fn execute(&mut self, r: &Request) -> Result<(), SessionError> {
        let fua = r.flags & proto::CMD_FLAG_FUA != 0;
        let offset = r.offset;
        let length = u64::from(r.length);
        let result = match r.command {
            proto::CMD_READ => return self.read(r),
            proto::CMD_WRITE => self.write(r)?,
            proto::CMD_FLUSH => self.export.flush(),
            proto::CMD_TRIM if length == 0 => Ok(()),
            proto::CMD_TRIM => self.export.trim(offset, length),
            proto::CMD_WRITE_ZEROES if length == 0 => Ok(()),
            proto::CMD_WRITE_ZEROES => {
                let may_trim = r.flags & proto::CMD_FLAG_NO_HOLE == 0;
                self.export.write_zeroes(offset, length, may_trim)
            }
            _ => unreachable!("check() admits only READ, WRITE, FLUSH, TRIM and WRITE_ZEROES"),
        };
        // FUA: the reply waits until the data written by this command is stable.
        let result = match result {
            Ok(()) if fua && r.command != proto::CMD_FLUSH => self.export.flush(),
            other => other,
        };
        let error = match result {
            Ok(()) => 0,
            Err(e) => {
                self.device_error(r, &e);
                nbd_error(&e)
            }
        };
        self.reply(r.handle, error)
    }

    /// Serves a READ: the first chunk is read before the reply header goes out, so a device
    /// error there is an ordinary error reply; a failure in a later chunk can only be reported
    /// by a hard disconnect.
    fn read(&mut self, r: &Request) -> Result<(), SessionError> {
        let total = r.length as usize;
        if total == 0 {
            return self.reply(r.handle, 0);
        }
        let first = total.min(IO_CHUNK);
        let header = proto::SIMPLE_REPLY_LEN;
        self.ensure_buf(header + first);
        if let Err(e) = self
            .export
            .read_at(&mut self.buf[header..header + first], r.offset)
        {
            self.device_error(r, &e);
            return self.reply(r.handle, nbd_error(&e));
        }
        self.buf[..header].copy_from_slice(
            &SimpleReply {
                error: 0,
                handle: r.handle,
            }
            .encode(),
        );
        self.conn.write_all(&self.buf[..header + first])?;
        let mut done = first;
        while done < total {
            let n = (total - done).min(IO_CHUNK);
            let offset = r.offset + done as u64;
            let chunk = &mut self.buf[header..header + n];
            self.export
                .read_at(chunk, offset)
                .map_err(SessionError::ReadAfterHeader)?;
            self.conn.write_all(&self.buf[header..header + n])?;
            done += n;
        }
        self.stats
            .bytes_read
            .fetch_add(total as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Serves a WRITE's payload chunk by chunk. After a device error the rest of the payload
    /// is still read (and dropped) to keep the stream in step; the outer result is the socket,
    /// the inner one the device.
    fn write(&mut self, r: &Request) -> Result<io::Result<()>, SessionError> {
        let total = r.length as usize;
        let mut done = 0;
        let mut outcome = Ok(());
        while done < total {
            let n = (total - done).min(IO_CHUNK);
            let offset = r.offset + done as u64;
            self.ensure_buf(n);
            self.conn.read_exact(&mut self.buf[..n])?;
            if outcome.is_ok() {
                outcome = self.export.write_at(&self.buf[..n], offset);
            }
            done += n;
        }
        if outcome.is_ok() {
            self.stats
                .bytes_written
                .fetch_add(total as u64, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    fn reply(&mut self, handle: u64, error: u32) -> Result<(), SessionError> {
        if error != 0 {
            self.stats.request_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.conn
            .write_all(&SimpleReply { error, handle }.encode())?;
        Ok(())
    }

    fn device_error(&self, r: &Request, e: &io::Error) {
        tracing::debug!(
            command = proto::command_name(r.command),
            offset = r.offset,
            length = r.length,
            error = %e,
            "device request failed"
        );
    }

    fn ensure_buf(&mut self, n: usize) {
        debug_assert!(n <= IO_CHUNK + proto::SIMPLE_REPLY_LEN);
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
    }
}

/// The NBD error value for a device error (see [`BlockExport`]).
pub(crate) fn nbd_error(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EROFS | libc::EACCES) => proto::EPERM,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => proto::ENOSPC,
        Some(libc::EINVAL | libc::EOPNOTSUPP) => proto::EINVAL,
        Some(libc::ESHUTDOWN) => proto::ESHUTDOWN,
        Some(_) => proto::EIO,
        None if e.kind() == io::ErrorKind::Unsupported => proto::EINVAL,
        None if e.kind() == io::ErrorKind::InvalidInput => proto::EINVAL,
        None => proto::EIO,
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: name length, name, count, information types.
#[derive(Debug)]
struct InfoRequest<'d> {
    name: &'d [u8],
    infos: &'d [u8],
}

impl<'d> InfoRequest<'d> {
    fn parse(data: &'d [u8]) -> Option<InfoRequest<'d>> {
        let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        // "32 bits, length of name (unsigned); MUST be no larger than the option data
        // length - 6"
        if name_len > data.len().checked_sub(6)? {
            return None;
        }
        let name = &data[4..4 + name_len];
        let count_at = 4 + name_len;
        let count = u16::from_be_bytes([data[count_at], data[count_at + 1]]) as usize;
        let infos = &data[count_at + 2..];
        (infos.len() == count * 2).then_some(InfoRequest { name, infos })
    }

    fn wants(&self, info: u16) -> bool {
        self.infos
            .chunks_exact(2)
            .any(|c| u16::from_be_bytes([c[0], c[1]]) == info)
    }
}

fn info_string(info: u16, s: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&info.to_be_bytes());
    v.extend_from_slice(s);
    v
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_follows_the_length_rules() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"xvda");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&proto::INFO_NAME.to_be_bytes());
        let r = InfoRequest::parse(&d).unwrap();
        assert_eq!(r.name, b"xvda");
        assert!(r.wants(proto::INFO_NAME) && r.wants(proto::INFO_BLOCK_SIZE));
        assert!(!r.wants(proto::INFO_DESCRIPTION));

        // The default export with no requests.
        let empty = [0, 0, 0, 0, 0, 0];
        assert_eq!(InfoRequest::parse(&empty).unwrap().name, b"");
        // Too short, a name running past the data, a count that does not match.
        assert!(InfoRequest::parse(&[0, 0, 0, 0, 0]).is_none());
        assert!(InfoRequest::parse(&[0, 0, 0, 1, 0, 0]).is_none());
        assert!(InfoRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_none());
        assert!(InfoRequest::parse(&[0, 0, 0, 0, 0, 1]).is_none());
        assert!(InfoRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 3]).is_none());
    }

    #[test]
    fn device_errors_map_to_nbd_errors() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(nbd_error(&os(libc::EROFS)), proto::EPERM);
        assert_eq!(nbd_error(&os(libc::EDQUOT)), proto::ENOSPC);
        assert_eq!(nbd_error(&os(libc::EFBIG)), proto::ENOSPC);
        assert_eq!(nbd_error(&os(libc::EINVAL)), proto::EINVAL);
        assert_eq!(nbd_error(&os(libc::EOPNOTSUPP)), proto::EINVAL);
        assert_eq!(nbd_error(&io::ErrorKind::Unsupported.into()), proto::EINVAL);
        assert_eq!(nbd_error(&os(libc::ESHUTDOWN)), proto::ESHUTDOWN);
        assert_eq!(nbd_error(&os(libc::ENOMEM)), proto::EIO);
        assert_eq!(nbd_error(&os(libc::EBADMSG)), proto::EIO);
        assert_eq!(nbd_error(&io::ErrorKind::UnexpectedEof.into()), proto::EIO);
    }

    #[test]
    fn truncation_keeps_utf8_whole() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
