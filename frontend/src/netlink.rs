//! A minimal generic netlink client: one request, its replies and its acknowledgement.
//!
//! Just enough of `netlink(7)` and `genetlink` for the kernel's NBD and vDPA families (`knbd`,
//! `vduse`): resolve a family by
//! name (`CTRL_CMD_GETFAMILY`), send a command with attributes (flat, nested, integers,
//! strings), and collect the attributes of the kernel's replies until its `NLMSG_ERROR`
//! acknowledgement. The socket and its two system calls live behind [`GenlSocket`]; every
//! message the kernel sends back is parsed with checked lengths.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDR_LEN: usize = 16;
const GENL_HDR_LEN: usize = 4;
const NLA_HDR_LEN: usize = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
/// Marks an attribute whose payload is more attributes.
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// Attributes of one message being built, in netlink's wire format (native byte order).
#[derive(Debug, Default, Clone)]
pub(crate) struct Attrs(Vec<u8>);

impl Attrs {
    pub(crate) fn new() -> Attrs {
        Attrs::default()
    }

    fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Attrs {
        let len = u16::try_from(NLA_HDR_LEN + payload.len()).expect("attributes are small");
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    pub(crate) fn u32(&mut self, kind: u16, v: u32) -> &mut Attrs {
        self.put(kind, &v.to_ne_bytes())
    }

    pub(crate) fn u64(&mut self, kind: u16, v: u64) -> &mut Attrs {
        self.put(kind, &v.to_ne_bytes())
    }

    /// A NUL-terminated string.
    pub(crate) fn string(&mut self, kind: u16, s: &str) -> &mut Attrs {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(kind, &b)
    }

    pub(crate) fn nested(&mut self, kind: u16, inner: &Attrs) -> &mut Attrs {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// One attribute of a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attr {
    pub(crate) kind: u16,
    pub(crate) payload: Vec<u8>,
}

impl Attr {
    pub(crate) fn as_u32(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?))
    }

    fn as_u16(&self) -> Option<u16> {
        Some(u16::from_ne_bytes(self.payload.get(..2)?.try_into().ok()?))
    }
}

/// Parses a run of attributes; `None` if a length runs past the data.
pub(crate) fn parse_attrs(mut data: &[u8]) -> Option<Vec<Attr>> {
    let mut out = Vec::new();
    while data.len() >= NLA_HDR_LEN {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDR_LEN || len > data.len() {
            return None;
        }
        out.push(Attr {
            kind,
            payload: data[NLA_HDR_LEN..len].to_vec(),
        });
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    Some(out)
}

/// A bound `NETLINK_GENERIC` socket.
#[derive(Debug)]
pub(crate) struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    pub(crate) fn open() -> io::Result<GenlSocket> {
        // SAFETY: socket(2) takes only scalar arguments; a non-negative result is a new
        // descriptor that nothing else owns, so OwnedFd may take it.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = GenlSocket { fd, seq: 0 };
        // A 10 s receive timeout: a kernel that never answers must not hang the frontend.
        socket.set_receive_timeout(10)?;
        Ok(socket)
    }

    /// How long a request waits for the kernel's answer, in seconds (10 by default): a kernel
    /// that never answers must not hang the frontend.
    pub(crate) fn set_receive_timeout(&self, seconds: i64) -> io::Result<()> {
        let timeout = libc::timeval {
            // `time_t` is 64 bits on every target built here (musl 1.2 too); `as _` names the
            // field's type without the alias libc deprecates for musl.
            tv_sec: seconds as _,
            tv_usec: 0,
        };
        // SAFETY: the option value is a live timeval of the size passed.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The id of the generic netlink family `name`, or `None` if the kernel has no such family
    /// (its module is not loaded).
    pub(crate) fn family(&mut self, name: &str) -> io::Result<Option<u16>> {
        let mut attrs = Attrs::new();
        attrs.string(CTRL_ATTR_FAMILY_NAME, name);
        let replies = match self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &attrs) {
            Ok(replies) => replies,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(replies
            .iter()
            .flatten()
            .find(|a| a.kind == CTRL_ATTR_FAMILY_ID)
            .and_then(Attr::as_u16))
    }

    /// Sends command `cmd` of `family` with `attrs`, asking for an acknowledgement; returns the
    /// attributes of every reply message before it, or the kernel's error.
    pub(crate) fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &Attrs,
    ) -> io::Result<Vec<Vec<Attr>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = NLMSG_HDR_LEN + GENL_HDR_LEN + attrs.0.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
        m.extend_from_slice(&family.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns ours
        m.extend_from_slice(&[cmd, version, 0, 0]);
        m.extend_from_slice(&attrs.0);
        self.send(&m)?;

        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            let mut data = &buf[..n];
            while data.len() >= NLMSG_HDR_LEN {
                let mlen = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                let mseq = u32::from_ne_bytes(data[8..12].try_into().expect("4 bytes"));
                if mlen < NLMSG_HDR_LEN || mlen > data.len() {
                    return Err(bad("a netlink message longer than what was received"));
                }
                let body = &data[NLMSG_HDR_LEN..mlen];
                data = &data[mlen.next_multiple_of(4).min(data.len())..];
                if mseq != seq {
                    continue; // a late answer to an earlier request
                }
                match kind {
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .ok_or_else(|| bad("a short NLMSG_ERROR"))?;
                        return if code == 0 {
                            Ok(replies)
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => {
                        let attrs = body
                            .get(GENL_HDR_LEN..)
                            .and_then(parse_attrs)
                            .ok_or_else(|| bad("malformed attributes in a netlink reply"))?;
                        replies.push(attrs);
                    }
                }
            }
        }
    }

    fn send(&self, m: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl is valid; its family is set below.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `m` is a live buffer of the length passed, and `kernel` a live sockaddr_nl
        // of the size passed; sendto reads both and keeps neither.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a live, writable buffer of the length passed.
            let r =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let mut item = Attrs::new();
        item.u32(1, 7);
        let mut sockets = Attrs::new();
        sockets.nested(1, &item).nested(1, &item);
        let mut a = Attrs::new();
        a.u32(1, 3)
            .u64(2, 1 << 33)
            .string(10, "xvda")
            .nested(7, &sockets);
        let parsed = parse_attrs(&a.0).unwrap();
        assert_eq!(parsed.len(), 4);
        assert_eq!(parsed[0].as_u32(), Some(3));
        assert_eq!(parsed[1].payload, (1u64 << 33).to_ne_bytes());
        assert_eq!(parsed[2].payload, b"xvda\0");
        assert_eq!(parsed[3].kind, 7, "the nested flag is masked off");
        let items = parse_attrs(&parsed[3].payload).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(parse_attrs(&items[1].payload).unwrap()[0].as_u32(), Some(7));
    }

    #[test]
    fn a_length_past_the_data_is_refused() {
        let mut a = Attrs::new();
        a.u64(2, 5);
        let mut bytes = a.0.clone();
        bytes[0] = 200;
        assert!(parse_attrs(&bytes).is_none());
        bytes[0] = 2; // shorter than a header
        assert!(parse_attrs(&bytes).is_none());
    }
}
