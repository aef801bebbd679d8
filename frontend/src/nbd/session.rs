//! One NBD connection on the server side: the fixed newstyle handshake, then transmission
//! ([`transmit`](super::transmit)).
//!
//! The session owns the protocol state of one client. Everything the client sends is hostile
//! until checked: option lengths are capped before anything is allocated, and a client that
//! breaks the protocol loses only its own connection. The handshake negotiates structured
//! replies and the `base:allocation` metadata context on request; transmission then serves
//! many requests at once and replies as each completes.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::conn::{ConnError, ServerConn};
use super::export::BlockExport;
use super::proto::{self, OptionHeader, OptionReplyHeader};
use super::server::{ExportSettings, StatCounters};
use super::transmit::{self, Transmission};

/// The largest option payload read from a client. `NBD_OPT_GO` with a 4096-byte name and a few
/// information requests fits many times; anything larger is treated as an attack and ends the
/// connection ("Termination of the session during option haggling": a server MAY hard-disconnect
/// a client whose behaviour it deems a denial of service).
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options accepted in one handshake before the client is deemed abusive.
const MAX_OPTIONS: usize = 1024;
/// The context id of `base:allocation` in SET_META_CONTEXT replies and BLOCK_STATUS chunks.
const ALLOCATION_CONTEXT_ID: u32 = 1;
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

/// The server side of one connection.
pub(crate) struct Session<'a> {
    conn: ServerConn<'a>,
    export: &'a dyn BlockExport,
    settings: &'a ExportSettings,
    stats: &'a StatCounters,
    /// The reader's chunk buffer during transmission; at most a reply header and `IO_CHUNK`.
    buf: Vec<u8>,
    /// `NBD_OPT_STRUCTURED_REPLY` was agreed.
    structured: bool,
    /// `base:allocation` was selected by `NBD_OPT_SET_META_CONTEXT`.
    allocation: bool,
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
            structured: false,
            allocation: false,
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
        let connection = transmit::Connection {
            conn: &mut self.conn,
            export: self.export,
            settings: self.settings,
            stats: self.stats,
            buf: &mut self.buf,
        };
        transmit::run(connection, transmission)
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
                proto::OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        let message = "STRUCTURED_REPLY takes no data";
                        self.option_error(option, proto::REP_ERR_INVALID, message)?;
                        continue;
                    }
                    self.structured = true;
                    self.option_reply(option, proto::REP_ACK, &[])?;
                }
                proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                    self.meta_context(option, &data)?;
                }
                // TLS, extended headers and anything newer are not implemented:
                // NBD_REP_ERR_UNSUP, and the session continues ("Baseline").
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
            self.unknown_export(option, request.name)?;
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

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the one context offered is
    /// `base:allocation`. LIST answers every query that names it (or the whole `base:`
    /// namespace, or no query at all); SET selects it when asked for it by name, and replaces
    /// any earlier selection. Unknown contexts are left out of the answer, as the protocol says.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), SessionError> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set && !self.structured {
            let message = "SET_META_CONTEXT needs structured replies first";
            self.option_error(option, proto::REP_ERR_INVALID, message)?;
            return Ok(());
        }
        let Some(request) = MetaRequest::parse(data) else {
            let message = "malformed request: name length, name, count, queries";
            self.option_error(option, proto::REP_ERR_INVALID, message)?;
            return Ok(());
        };
        if !self.settings.names(request.name) {
            self.unknown_export(option, request.name)?;
            return Ok(());
        }
        let base = proto::CONTEXT_BASE_ALLOCATION.as_bytes();
        let matches = if set {
            request.queries.contains(&base)
        } else {
            request.queries.is_empty()
                || request.queries.iter().any(|q| *q == base || *q == b"base:")
        };
        if set {
            self.allocation = matches;
        }
        if matches {
            // "For NBD_OPT_LIST_META_CONTEXT the server MUST set the context ID to 0."
            let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            let mut reply = Vec::with_capacity(4 + base.len());
            reply.extend_from_slice(&id.to_be_bytes());
            reply.extend_from_slice(base);
            self.option_reply(option, proto::REP_META_CONTEXT, &reply)?;
        }
        self.option_reply(option, proto::REP_ACK, &[])?;
        Ok(())
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
            structured: self.structured,
            allocation_context: (self.structured && self.allocation)
                .then_some(ALLOCATION_CONTEXT_ID),
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

    /// `NBD_REP_ERR_UNKNOWN` for an option naming an export this server does not have.
    fn unknown_export(&mut self, option: u32, name: &[u8]) -> Result<(), ConnError> {
        let message = format!(
            "no export named {:?}; this server exports {:?}",
            String::from_utf8_lossy(name),
            self.settings.name
        );
        self.option_error(option, proto::REP_ERR_UNKNOWN, &message)
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

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: name length, name,
/// number of queries, then each query as a length and a string.
#[derive(Debug)]
struct MetaRequest<'d> {
    name: &'d [u8],
    queries: Vec<&'d [u8]>,
}

impl<'d> MetaRequest<'d> {
    fn parse(data: &'d [u8]) -> Option<MetaRequest<'d>> {
        let mut rest = data;
        let mut take = |n: usize| -> Option<&'d [u8]> {
            let (head, tail) = rest.split_at_checked(n)?;
            rest = tail;
            Some(head)
        };
        let u32_at = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("four bytes")) as usize;
        let name_len = u32_at(take(4)?);
        if name_len > proto::MAX_STRING_LEN {
            return None;
        }
        let name = take(name_len)?;
        let count = u32_at(take(4)?);
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = u32_at(take(4)?);
            if len > proto::MAX_STRING_LEN {
                return None;
            }
            queries.push(take(len)?);
        }
        (rest.is_empty()).then_some(MetaRequest { name, queries })
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
    fn meta_context_requests_follow_the_length_rules() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"xvda");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        let r = MetaRequest::parse(&d).unwrap();
        assert_eq!(r.name, b"xvda");
        assert_eq!(
            r.queries,
            vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]
        );
        // Trailing bytes, a short query, a count beyond the data.
        let mut extra = d.clone();
        extra.push(0);
        assert!(MetaRequest::parse(&extra).is_none());
        assert!(MetaRequest::parse(&d[..d.len() - 1]).is_none());
        let mut many = Vec::new();
        many.extend_from_slice(&0u32.to_be_bytes());
        many.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaRequest::parse(&many).is_none());
        let empty = [0u8, 0, 0, 0, 0, 0, 0, 0];
        let r = MetaRequest::parse(&empty).unwrap();
        assert!(r.name.is_empty() && r.queries.is_empty());
    }

    #[test]
    fn truncation_keeps_utf8_whole() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
