//! Errors of the xenstore client, the in-memory store and the xenbus layer.
//!
//! One enum, [`XsError`], crosses the [`XenStore`](crate::XenStore) trait, so that code written
//! against the trait handles the real daemon and the in-memory store alike. Errors the daemon
//! returns keep its errno name ([`Errno`]), including names this crate does not know.

use std::fmt;
use std::time::Duration;

use crate::wire::MsgType;

/// An errno name as xenstored sends it in an `XS_ERROR` reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Errno {
    /// No such node, watch or transaction.
    ENOENT,
    /// Permission denied.
    EACCES,
    /// Transaction conflict: retry it.
    EAGAIN,
    /// The reply would exceed the payload limit (use `DIRECTORY_PART`), or too many watches.
    E2BIG,
    /// A quota was hit (node size, node count, transactions).
    ENOSPC,
    /// Invalid argument (bad path, bad message).
    EINVAL,
    /// Already exists (a duplicate watch).
    EEXIST,
    /// Is a directory.
    EISDIR,
    /// The daemon ran out of memory, or a transaction failed internally.
    ENOMEM,
    /// A quota was hit (oxenstored's name).
    EQUOTA,
    /// Read-only.
    EROFS,
    /// Busy (a nested transaction).
    EBUSY,
    /// I/O error inside the daemon.
    EIO,
    /// Operation not implemented by this daemon.
    ENOSYS,
    /// Connection reset.
    ECONNRESET,
    /// Operation not permitted (a guest changing a node's owner).
    EPERM,
    /// Directory not empty.
    ENOTEMPTY,
    /// Already connected.
    EISCONN,
    /// Any other name, kept as sent.
    Other(String),
}

impl Errno {
    const KNOWN: [Errno; 18] = [
        Errno::ENOENT,
        Errno::EACCES,
        Errno::EAGAIN,
        Errno::E2BIG,
        Errno::ENOSPC,
        Errno::EINVAL,
        Errno::EEXIST,
        Errno::EISDIR,
        Errno::ENOMEM,
        Errno::EQUOTA,
        Errno::EROFS,
        Errno::EBUSY,
        Errno::EIO,
        Errno::ENOSYS,
        Errno::ECONNRESET,
        Errno::EPERM,
        Errno::ENOTEMPTY,
        Errno::EISCONN,
    ];

    /// The errno of a name as sent by the daemon.
    pub fn from_name(name: &str) -> Errno {
        Errno::KNOWN
            .iter()
            .find(|e| e.name() == name)
            .cloned()
            .unwrap_or_else(|| Errno::Other(name.to_owned()))
    }

    /// The name as the daemon sends it.
    pub fn name(&self) -> &str {
        match self {
            Errno::ENOENT => "ENOENT",
            Errno::EACCES => "EACCES",
            Errno::EAGAIN => "EAGAIN",
            Errno::E2BIG => "E2BIG",
            Errno::ENOSPC => "ENOSPC",
            Errno::EINVAL => "EINVAL",
            Errno::EEXIST => "EEXIST",
            Errno::EISDIR => "EISDIR",
            Errno::ENOMEM => "ENOMEM",
            Errno::EQUOTA => "EQUOTA",
            Errno::EROFS => "EROFS",
            Errno::EBUSY => "EBUSY",
            Errno::EIO => "EIO",
            Errno::ENOSYS => "ENOSYS",
            Errno::ECONNRESET => "ECONNRESET",
            Errno::EPERM => "EPERM",
            Errno::ENOTEMPTY => "ENOTEMPTY",
            Errno::EISCONN => "EISCONN",
            Errno::Other(s) => s,
        }
    }

    /// What the errno means in xenstore terms.
    pub fn meaning(&self) -> &'static str {
        match self {
            Errno::ENOENT => "no such node",
            Errno::EACCES => "permission denied",
            Errno::EAGAIN => "transaction conflict, retry",
            Errno::E2BIG => "reply or request too big",
            Errno::ENOSPC => "quota exceeded",
            Errno::EINVAL => "invalid argument",
            Errno::EEXIST => "already exists",
            Errno::EISDIR => "is a directory",
            Errno::ENOMEM => "out of memory",
            Errno::EQUOTA => "quota exceeded",
            Errno::EROFS => "read-only",
            Errno::EBUSY => "busy",
            Errno::EIO => "daemon I/O error",
            Errno::ENOSYS => "not supported by this daemon",
            Errno::ECONNRESET => "connection reset",
            Errno::EPERM => "operation not permitted",
            Errno::ENOTEMPTY => "directory not empty",
            Errno::EISCONN => "already connected",
            Errno::Other(_) => "unknown error",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.meaning())
    }
}

/// Everything that can go wrong talking to xenstore.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// The daemon answered the request with an error.
    #[error("xenstore {op}{} failed: {errno}", of_path(.path))]
    Daemon {
        /// The request.
        op: MsgType,
        /// The path (or other subject) of the request; empty when it has none.
        path: String,
        /// The errno name the daemon sent.
        errno: Errno,
    },
    /// A path over `XENSTORE_ABS_PATH_MAX` or `XENSTORE_REL_PATH_MAX`; nothing was sent.
    #[error(
        "{} path {path:?} is {len} bytes, over xenstore's limit of {max}; nothing was sent",
        if *.absolute { "absolute" } else { "relative" }
    )]
    PathTooLong {
        /// The path, shortened.
        path: String,
        /// Its length.
        len: usize,
        /// The limit that applies.
        max: usize,
        /// Whether the absolute limit applied.
        absolute: bool,
    },
    /// A value that does not fit in one message with its path; nothing was sent.
    #[error(
        "value for {path:?} is {len} bytes, over the {max} bytes that fit in one xenstore message; nothing was sent"
    )]
    ValueTooLong {
        /// The path, shortened.
        path: String,
        /// The value's length.
        len: usize,
        /// The largest value that fits with this path.
        max: usize,
    },
    /// A request payload over `XENSTORE_PAYLOAD_MAX`; nothing was sent.
    #[error(
        "xenstore {op} request is {len} bytes, over the {max}-byte payload limit; nothing was sent"
    )]
    PayloadTooLong {
        /// The request.
        op: MsgType,
        /// Payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A path that cannot be sent at all.
    #[error("invalid xenstore path {path:?}: {reason}")]
    InvalidPath {
        /// The path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// Any other argument that cannot be sent.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// What the argument is.
        what: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A permission string that is not `n`, `r`, `w` or `b` followed by a domid.
    #[error("invalid xenstore permission {text:?}: {reason}")]
    BadPerm {
        /// The text.
        text: String,
        /// Why it does not parse.
        reason: &'static str,
    },
    /// The connection to the daemon is gone; every pending and later request fails with this.
    #[error("the connection to xenstored was lost: {reason}")]
    ConnectionLost {
        /// What happened (EOF, read error, daemon closed, client dropped).
        reason: String,
    },
    /// The daemon's reply does not follow the protocol.
    #[error("xenstored sent a malformed reply to {op}: {reason}")]
    BadReply {
        /// The request.
        op: MsgType,
        /// What is wrong with it.
        reason: String,
    },
    /// A request got no reply within the client's request timeout.
    #[error("xenstore {op}{} got no reply within {after:?}", of_path(.path))]
    Timeout {
        /// The request.
        op: MsgType,
        /// Its path, if any.
        path: String,
        /// The timeout.
        after: Duration,
    },
    /// No transport could be opened; every candidate is listed with its error.
    #[error("no xenstore transport found; tried {}", tried_list(.tried))]
    TransportNotFound {
        /// Each path tried, with why it failed.
        tried: Vec<(String, String)>,
    },
    /// An I/O error outside a request (opening a transport, creating an event pipe).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A transaction still hit EAGAIN after the bounded number of attempts.
    #[error("xenstore transaction still conflicted (EAGAIN) after {attempts} attempts")]
    TransactionRetriesExhausted {
        /// Attempts made.
        attempts: u32,
    },
    /// A node holds a value that does not parse as the expected type.
    #[error("{path} holds {value:?}, which is not {expected}")]
    BadValue {
        /// The node.
        path: String,
        /// The value (lossily decoded, shortened).
        value: String,
        /// What was expected ("a decimal u32", "a xenbus state", ...).
        expected: &'static str,
    },
    /// A wait for a node's value timed out.
    #[error("timed out after {waited:?} waiting on {path} (last seen: {last})")]
    WaitTimeout {
        /// The node waited on.
        path: String,
        /// Its last value, or "absent".
        last: String,
        /// How long the wait lasted.
        waited: Duration,
    },
    /// A node that was waited on or updated disappeared.
    #[error("{path} disappeared (the device or domain was removed)")]
    NodeVanished {
        /// The node.
        path: String,
    },
}

fn of_path(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" of {path:?}")
    }
}

fn tried_list(tried: &[(String, String)]) -> String {
    if tried.is_empty() {
        return "nothing".to_owned();
    }
    tried
        .iter()
        .map(|(p, e)| format!("{p} ({e})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl XsError {
    /// The daemon's errno, if the daemon answered with an error.
    pub fn errno(&self) -> Option<&Errno> {
        match self {
            XsError::Daemon { errno, .. } => Some(errno),
            _ => None,
        }
    }

    /// Whether the daemon said ENOENT.
    pub fn is_enoent(&self) -> bool {
        self.errno() == Some(&Errno::ENOENT)
    }

    /// Whether the daemon said EACCES.
    pub fn is_eacces(&self) -> bool {
        self.errno() == Some(&Errno::EACCES)
    }

    /// Whether the daemon said EAGAIN (a transaction conflict).
    pub fn is_eagain(&self) -> bool {
        self.errno() == Some(&Errno::EAGAIN)
    }

    /// Whether the connection is gone for good.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, XsError::ConnectionLost { .. })
    }

    pub(crate) fn daemon(op: MsgType, path: &str, errno: Errno) -> XsError {
        XsError::Daemon {
            op,
            path: crate::wire::shorten(path),
            errno,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_round_trip_and_unknown_names_are_kept() {
        for e in Errno::KNOWN {
            assert_eq!(Errno::from_name(e.name()), e);
        }
        assert_eq!(Errno::from_name("EWEIRD"), Errno::Other("EWEIRD".into()));
        assert_eq!(Errno::from_name("EWEIRD").name(), "EWEIRD");
    }

    #[test]
    fn messages_name_the_operation_path_and_errno() {
        let e = XsError::daemon(MsgType::Read, "/local/domain/5/x", Errno::ENOENT);
        assert_eq!(
            e.to_string(),
            "xenstore READ of \"/local/domain/5/x\" failed: ENOENT (no such node)"
        );
        assert!(e.is_enoent() && !e.is_eacces());
        let e = XsError::daemon(MsgType::TransactionStart, "", Errno::ENOSPC);
        assert_eq!(
            e.to_string(),
            "xenstore TRANSACTION_START failed: ENOSPC (quota exceeded)"
        );
        let e = XsError::TransportNotFound {
            tried: vec![
                ("/run/xenstored/socket".into(), "No such file".into()),
                ("/dev/xen/xenbus".into(), "EACCES".into()),
            ],
        };
        let s = e.to_string();
        assert!(
            s.contains("/run/xenstored/socket") && s.contains("/dev/xen/xenbus"),
            "{s}"
        );
    }
}
