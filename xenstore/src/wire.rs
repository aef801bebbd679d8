//! The xenstore wire protocol: the `xsd_sockmsg` header, message types, limits, payload
//! encoding and a stream framer.
//!
//! This module owns the byte layout shared by the unix socket, `/dev/xen/xenbus` and the
//! xenstore ring (Xen's `xen/include/public/io/xs_wire.h`) and the checks every request passes
//! before it is sent. It does no I/O and never trusts a length it reads: a header announcing a
//! payload over [`PAYLOAD_MAX`] is a protocol error, never an allocation.

use crate::error::XsError;

/// Largest payload of one message, in bytes (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Largest absolute path, in bytes (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;
/// Largest relative path, in bytes (`XENSTORE_REL_PATH_MAX`).
pub const REL_PATH_MAX: usize = 2048;
/// Size of the `xsd_sockmsg` header.
pub const HEADER_LEN: usize = 16;
/// The domid a domain may use to name itself (`DOMID_SELF`).
pub const DOMID_SELF: u16 = 0x7ff0;

/// The message types of `enum xsd_sockmsg_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    /// `XS_CONTROL` (also `XS_DEBUG`).
    Control = 0,
    /// `XS_DIRECTORY`.
    Directory = 1,
    /// `XS_READ`.
    Read = 2,
    /// `XS_GET_PERMS`.
    GetPerms = 3,
    /// `XS_WATCH`.
    Watch = 4,
    /// `XS_UNWATCH`.
    Unwatch = 5,
    /// `XS_TRANSACTION_START`.
    TransactionStart = 6,
    /// `XS_TRANSACTION_END`.
    TransactionEnd = 7,
    /// `XS_INTRODUCE`.
    Introduce = 8,
    /// `XS_RELEASE`.
    Release = 9,
    /// `XS_GET_DOMAIN_PATH`.
    GetDomainPath = 10,
    /// `XS_WRITE`.
    Write = 11,
    /// `XS_MKDIR`.
    Mkdir = 12,
    /// `XS_RM`.
    Rm = 13,
    /// `XS_SET_PERMS`.
    SetPerms = 14,
    /// `XS_WATCH_EVENT`.
    WatchEvent = 15,
    /// `XS_ERROR`.
    Error = 16,
    /// `XS_IS_DOMAIN_INTRODUCED`.
    IsDomainIntroduced = 17,
    /// `XS_RESUME`.
    Resume = 18,
    /// `XS_SET_TARGET`.
    SetTarget = 19,
    /// `XS_RESET_WATCHES` (20 was `XS_RESTRICT`, removed).
    ResetWatches = 21,
    /// `XS_DIRECTORY_PART`.
    DirectoryPart = 22,
}

impl MsgType {
    /// Every message type, in wire order.
    pub const ALL: [MsgType; 22] = [
        MsgType::Control,
        MsgType::Directory,
        MsgType::Read,
        MsgType::GetPerms,
        MsgType::Watch,
        MsgType::Unwatch,
        MsgType::TransactionStart,
        MsgType::TransactionEnd,
        MsgType::Introduce,
        MsgType::Release,
        MsgType::GetDomainPath,
        MsgType::Write,
        MsgType::Mkdir,
        MsgType::Rm,
        MsgType::SetPerms,
        MsgType::WatchEvent,
        MsgType::Error,
        MsgType::IsDomainIntroduced,
        MsgType::Resume,
        MsgType::SetTarget,
        MsgType::ResetWatches,
        MsgType::DirectoryPart,
    ];

    /// The wire value.
    pub fn value(self) -> u32 {
        self as u32
    }

    /// The message type of a wire value, if it is one.
    pub fn from_value(value: u32) -> Option<MsgType> {
        MsgType::ALL.iter().copied().find(|t| t.value() == value)
    }

    /// The name xenstored uses in its logs (`READ`, `DIRECTORY_PART`, ...).
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Control => "CONTROL",
            MsgType::Directory => "DIRECTORY",
            MsgType::Read => "READ",
            MsgType::GetPerms => "GET_PERMS",
            MsgType::Watch => "WATCH",
            MsgType::Unwatch => "UNWATCH",
            MsgType::TransactionStart => "TRANSACTION_START",
            MsgType::TransactionEnd => "TRANSACTION_END",
            MsgType::Introduce => "INTRODUCE",
            MsgType::Release => "RELEASE",
            MsgType::GetDomainPath => "GET_DOMAIN_PATH",
            MsgType::Write => "WRITE",
            MsgType::Mkdir => "MKDIR",
            MsgType::Rm => "RM",
            MsgType::SetPerms => "SET_PERMS",
            MsgType::WatchEvent => "WATCH_EVENT",
            MsgType::Error => "ERROR",
            MsgType::IsDomainIntroduced => "IS_DOMAIN_INTRODUCED",
            MsgType::Resume => "RESUME",
            MsgType::SetTarget => "SET_TARGET",
            MsgType::ResetWatches => "RESET_WATCHES",
            MsgType::DirectoryPart => "DIRECTORY_PART",
        }
    }
}

impl std::fmt::Display for MsgType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The `struct xsd_sockmsg` header. Every field is a 32-bit integer in the byte order of the
/// machine; Xen runs little-endian on every architecture this project targets (x86_64 and
/// aarch64), so the encoding here is explicitly little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    /// The message type (`XS_*`), kept raw so that unknown types can be reported.
    pub msg_type: u32,
    /// Request identifier, echoed by the daemon in its reply; 0 in watch events.
    pub req_id: u32,
    /// Transaction id, 0 outside a transaction.
    pub tx_id: u32,
    /// Length of the payload that follows.
    pub len: u32,
}

impl MsgHeader {
    /// Encodes the header as the 16 bytes that go on the wire.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.msg_type.to_le_bytes());
        out[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        out[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Decodes a header from its 16 wire bytes.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> MsgHeader {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        MsgHeader {
            msg_type: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }
}

/// One whole message: header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The header; `header.len` equals `payload.len()`.
    pub header: MsgHeader,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// Builds a message, checking the payload limit.
    pub fn new(
        msg_type: MsgType,
        req_id: u32,
        tx_id: u32,
        payload: Vec<u8>,
    ) -> Result<Message, XsError> {
        if payload.len() > PAYLOAD_MAX {
            return Err(XsError::PayloadTooLong {
                op: msg_type,
                len: payload.len(),
                max: PAYLOAD_MAX,
            });
        }
        let len =
            u32::try_from(payload.len()).expect("a payload of at most 4096 bytes fits in u32");
        Ok(Message {
            header: MsgHeader {
                msg_type: msg_type.value(),
                req_id,
                tx_id,
                len,
            },
            payload,
        })
    }

    /// The message as one contiguous buffer, ready for a single `write()`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Reassembles messages from a byte stream (the socket and `/dev/xen/xenbus` both deliver a
/// stream, not datagrams).
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
}

/// The stream broke the protocol; the connection cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message header announces a {len}-byte payload, over the {PAYLOAD_MAX}-byte limit")]
pub struct FrameError {
    /// The announced payload length.
    pub len: u32,
}

impl Framer {
    /// An empty framer.
    pub fn new() -> Framer {
        Framer::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not form a whole message yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        let Some(head) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = MsgHeader::decode(head);
        let len = header.len as usize;
        if len > PAYLOAD_MAX {
            return Err(FrameError { len: header.len });
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(Message { header, payload }))
    }
}

/// Checks a node path before it is sent: non-empty, no NUL, within the absolute or relative
/// length limit. Special paths (`@releaseDomain`) count as absolute. Character-set and `//`
/// rules are left to the daemon, which answers EINVAL.
pub fn check_path(path: &str) -> Result<(), XsError> {
    if path.is_empty() {
        return Err(XsError::InvalidPath {
            path: String::new(),
            reason: "it is empty",
        });
    }
    if path.contains('\0') {
        return Err(XsError::InvalidPath {
            path: path.replace('\0', "\\0"),
            reason: "it contains a NUL byte",
        });
    }
    let absolute = path.starts_with('/') || path.starts_with('@');
    let max = if absolute { ABS_PATH_MAX } else { REL_PATH_MAX };
    if path.len() > max {
        return Err(XsError::PathTooLong {
            path: shorten(path),
            len: path.len(),
            max,
            absolute,
        });
    }
    Ok(())
}

/// Checks a watch token: no NUL (it is sent as a string).
pub fn check_token(token: &str) -> Result<(), XsError> {
    if token.contains('\0') {
        return Err(XsError::InvalidArgument {
            what: "watch token",
            reason: "it contains a NUL byte",
        });
    }
    Ok(())
}

/// Checks that `path` and a value of `value_len` bytes fit in one WRITE payload.
pub fn check_write(path: &str, value_len: usize) -> Result<(), XsError> {
    check_path(path)?;
    let len = path.len() + 1 + value_len;
    if len > PAYLOAD_MAX {
        return Err(XsError::ValueTooLong {
            path: shorten(path),
            len: value_len,
            max: PAYLOAD_MAX - path.len() - 1,
        });
    }
    Ok(())
}

/// Encodes strings as consecutive NUL-terminated strings.
pub fn join_strings<S: AsRef<str>>(parts: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// Splits a payload of NUL-terminated strings. A final string without its NUL is kept too
/// (libxenstore is lenient the same way). Returns `None` if a string is not UTF-8.
pub fn split_strings(payload: &[u8]) -> Option<Vec<String>> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() {
        return Some(Vec::new());
    }
    body.split(|b| *b == 0)
        .map(|s| String::from_utf8(s.to_vec()).ok())
        .collect()
}

/// The first string of a reply, without its NUL (e.g. "OK", a transaction id, an errno name).
pub fn first_string(payload: &[u8]) -> &[u8] {
    payload.split(|b| *b == 0).next().unwrap_or(payload)
}

/// A path cut to a length fit for an error message.
pub(crate) fn shorten(path: &str) -> String {
    const KEEP: usize = 96;
    if path.len() <= KEEP {
        return path.to_owned();
    }
    let mut end = KEEP;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &path[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of `enum xsd_sockmsg_type` in Xen's `xen/include/public/io/xs_wire.h` (4.17).
    #[test]
    fn msg_type_values_match_xs_wire_h() {
        let expected: [(MsgType, u32); 22] = [
            (MsgType::Control, 0),
            (MsgType::Directory, 1),
            (MsgType::Read, 2),
            (MsgType::GetPerms, 3),
            (MsgType::Watch, 4),
            (MsgType::Unwatch, 5),
            (MsgType::TransactionStart, 6),
            (MsgType::TransactionEnd, 7),
            (MsgType::Introduce, 8),
            (MsgType::Release, 9),
            (MsgType::GetDomainPath, 10),
            (MsgType::Write, 11),
            (MsgType::Mkdir, 12),
            (MsgType::Rm, 13),
            (MsgType::SetPerms, 14),
            (MsgType::WatchEvent, 15),
            (MsgType::Error, 16),
            (MsgType::IsDomainIntroduced, 17),
            (MsgType::Resume, 18),
            (MsgType::SetTarget, 19),
            (MsgType::ResetWatches, 21),
            (MsgType::DirectoryPart, 22),
        ];
        for (t, v) in expected {
            assert_eq!(t.value(), v, "{t}");
            assert_eq!(MsgType::from_value(v), Some(t));
        }
        assert_eq!(MsgType::from_value(20), None, "XS_RESTRICT was removed");
        assert_eq!(MsgType::from_value(23), None);
        assert_eq!(MsgType::ALL.len(), expected.len());
    }

    #[test]
    fn limits_match_xs_wire_h() {
        assert_eq!(PAYLOAD_MAX, 4096);
        assert_eq!(ABS_PATH_MAX, 3072);
        assert_eq!(REL_PATH_MAX, 2048);
        assert_eq!(HEADER_LEN, 4 * size_of::<u32>());
    }

    #[test]
    fn header_is_four_little_endian_words() {
        let h = MsgHeader {
            msg_type: 2,
            req_id: 0x0102_0304,
            tx_id: 7,
            len: 0x1000,
        };
        let b = h.encode();
        assert_eq!(b, [2, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(MsgHeader::decode(&b), h);
    }

    #[test]
    fn framer_reassembles_split_and_merged_messages() {
        let a = Message::new(MsgType::Read, 1, 0, b"/a\0".to_vec())
            .unwrap()
            .to_bytes();
        let b = Message::new(MsgType::WatchEvent, 0, 0, b"/b\0tok\0".to_vec())
            .unwrap()
            .to_bytes();
        let mut stream = a.clone();
        stream.extend_from_slice(&b);
        for cut in 0..stream.len() {
            let mut f = Framer::new();
            let mut got = Vec::new();
            for chunk in [&stream[..cut], &stream[cut..]] {
                f.push(chunk);
                while let Some(m) = f.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].payload, b"/a\0");
            assert_eq!(got[1].header.msg_type, MsgType::WatchEvent.value());
            assert_eq!(f.pending(), 0);
        }
    }

    #[test]
    fn framer_rejects_oversized_payload_without_allocating() {
        let mut f = Framer::new();
        f.push(
            &MsgHeader {
                msg_type: 2,
                req_id: 1,
                tx_id: 0,
                len: 4097,
            }
            .encode(),
        );
        assert_eq!(f.next_message(), Err(FrameError { len: 4097 }));
        let mut f = Framer::new();
        f.push(
            &MsgHeader {
                msg_type: 2,
                req_id: 1,
                tx_id: 0,
                len: u32::MAX,
            }
            .encode(),
        );
        assert!(f.next_message().is_err());
    }

    #[test]
    fn path_limits_are_checked() {
        check_path("/local/domain/0").unwrap();
        check_path("@releaseDomain").unwrap();
        check_path("device/virtio").unwrap();
        check_path(&format!("/{}", "a".repeat(ABS_PATH_MAX - 1))).unwrap();
        let e = check_path(&format!("/{}", "a".repeat(ABS_PATH_MAX))).unwrap_err();
        assert!(
            matches!(
                e,
                XsError::PathTooLong {
                    len: 3073,
                    max: 3072,
                    absolute: true,
                    ..
                }
            ),
            "{e}"
        );
        check_path(&"r".repeat(REL_PATH_MAX)).unwrap();
        let e = check_path(&"r".repeat(REL_PATH_MAX + 1)).unwrap_err();
        assert!(
            matches!(
                e,
                XsError::PathTooLong {
                    max: 2048,
                    absolute: false,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(check_path(""), Err(XsError::InvalidPath { .. })));
        assert!(matches!(
            check_path("/a\0b"),
            Err(XsError::InvalidPath { .. })
        ));
        assert!(check_token("t\0").is_err());
    }

    #[test]
    fn write_payload_limit_is_checked() {
        let path = "/a/b";
        check_write(path, PAYLOAD_MAX - path.len() - 1).unwrap();
        let e = check_write(path, PAYLOAD_MAX - path.len()).unwrap_err();
        assert!(matches!(e, XsError::ValueTooLong { max: 4091, .. }), "{e}");
        assert!(e.to_string().contains("/a/b"), "{e}");
    }

    #[test]
    fn strings_round_trip() {
        let p = join_strings(&["a", "bc", ""]);
        assert_eq!(p, b"a\0bc\0\0");
        assert_eq!(split_strings(b"a\0bc\0").unwrap(), vec!["a", "bc"]);
        assert_eq!(split_strings(b"a\0bc").unwrap(), vec!["a", "bc"]);
        assert_eq!(split_strings(b"").unwrap(), Vec::<String>::new());
        assert!(split_strings(b"\xff\0").is_none());
        assert_eq!(first_string(b"ENOENT\0"), b"ENOENT");
        assert_eq!(first_string(b"T"), b"T");
    }
}
