//! The errors of this crate: [`XenError`] for every platform operation, with [`Refusal`] (why
//! the loopback platform refused something, named after the check Xen makes) and
//! [`GrantStatus`] (a Xen `GNTST_*` code).
//!
//! Messages are sentences that name the device or ioctl and the domain, reference, port or frame
//! involved; they never repeat their `#[source]`, which a reporter prints after them.

use std::io;

use crate::platform::{DomId, Gfn, GrantRef, Port};

/// An error from a Xen device or from the loopback platform.
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    /// A Xen device could not be opened.
    #[error("cannot open {path}; load the {module} kernel module if it is missing")]
    Open {
        /// The device path, e.g. `/dev/xen/gntdev`.
        path: &'static str,
        /// The kernel module that provides it, e.g. `xen-gntdev`.
        module: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An ioctl failed for a reason that concerns no particular domain, grant or port.
    #[error("{ioctl} on {device} failed")]
    Ioctl {
        /// The device, e.g. `/dev/xen/evtchn`.
        device: &'static str,
        /// The ioctl, e.g. `IOCTL_EVTCHN_RESET`.
        ioctl: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Mapping pages into this process failed.
    #[error("mmap of {pages} pages of {device} failed")]
    Mmap {
        /// The device or memory being mapped.
        device: &'static str,
        /// Number of 4 KiB pages.
        pages: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A request was malformed before any system call was made.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// What was invalid, e.g. "grant copy segment 3".
        what: String,
        /// Why.
        why: String,
    },
    /// `IOCTL_GNTALLOC_ALLOC_GREF` failed.
    #[error("granting {pages} pages to domain {peer} failed")]
    Grant {
        /// The domain the pages were to be granted to.
        peer: DomId,
        /// Number of pages.
        pages: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Mapping a batch of grants failed (`IOCTL_GNTDEV_MAP_GRANT_REF` or the mmap after it).
    #[error("mapping {count} grants of domain {peer} (first ref {first_ref}) failed")]
    MapGrants {
        /// The granting domain.
        peer: DomId,
        /// Number of refs in the batch.
        count: usize,
        /// The first ref of the batch.
        first_ref: GrantRef,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// One segment of a grant copy failed in Xen.
    #[error("grant copy of ref {gref} of domain {peer} failed with {status}")]
    CopySegment {
        /// The granting domain.
        peer: DomId,
        /// The grant reference.
        gref: GrantRef,
        /// Xen's status for the segment.
        status: GrantStatus,
    },
    /// The loopback platform refused a grant, exactly where Xen would have.
    #[error("domain {mapper} cannot use ref {gref} of domain {peer}: {reason}")]
    GrantRefused {
        /// The domain that tried to map or copy.
        mapper: DomId,
        /// The granting domain.
        peer: DomId,
        /// The grant reference.
        gref: GrantRef,
        /// Which check failed.
        reason: Refusal,
    },
    /// Binding an event channel failed.
    #[error("binding an event channel to domain {remote} (remote port {remote_port:?}) failed")]
    Bind {
        /// The remote domain.
        remote: DomId,
        /// The remote port for an interdomain bind; `None` for an unbound port.
        remote_port: Option<Port>,
        /// The OS error (the loopback platform uses the errno Xen would give).
        #[source]
        source: io::Error,
    },
    /// An operation on a bound local port failed.
    #[error("{op} of event-channel port {port} failed")]
    Port {
        /// `"notify"`, `"unbind"`, `"unmap notify"`…
        op: &'static str,
        /// The local port.
        port: Port,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The loopback platform refused an event-channel operation.
    #[error("event channel {op} for domain {domid} refused: {reason}")]
    EventRefused {
        /// `"bind_interdomain"`, `"notify"`…
        op: &'static str,
        /// The domain acting.
        domid: DomId,
        /// Which check failed.
        reason: Refusal,
    },
    /// `IOCTL_PRIVCMD_MMAPBATCH_V2` failed as a whole (not on a particular page). The mapping
    /// has been undone.
    #[error("foreign mapping of {count} pages of domain {dom} (first gfn {first_gfn:#x}) failed")]
    ForeignMapBatch {
        /// The domain whose memory was mapped.
        dom: DomId,
        /// Pages in the request.
        count: usize,
        /// The first frame of the request.
        first_gfn: Gfn,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// A foreign mapping failed on one page (its `err[]` entry stayed non-zero after the
    /// retries). The mapping has been undone.
    #[error("foreign mapping of gfn {gfn:#x} (page {index} of {count}) of domain {dom} failed")]
    ForeignMap {
        /// The domain whose memory was mapped.
        dom: DomId,
        /// Index of the first failing page in the request.
        index: usize,
        /// Its frame number.
        gfn: Gfn,
        /// Pages in the request.
        count: usize,
        /// The page's errno from `err[]`.
        #[source]
        source: io::Error,
    },
    /// The loopback platform refused a foreign mapping.
    #[error("domain {mapper} cannot foreign-map gfn {gfn:#x} of domain {dom}: {reason}")]
    ForeignRefused {
        /// The domain that tried to map.
        mapper: DomId,
        /// The domain whose memory was asked for.
        dom: DomId,
        /// The first refused frame.
        gfn: Gfn,
        /// Which check failed.
        reason: Refusal,
    },
    /// Pinned memory with known frame numbers could not be set up.
    #[error("pinned memory of {pages} pages: {why}")]
    Pinned {
        /// Pages requested.
        pages: usize,
        /// What went wrong, e.g. that `/proc/self/pagemap` shows no frame numbers.
        why: String,
        /// The OS error, where there is one.
        #[source]
        source: Option<io::Error>,
    },
    /// A mapping was refused before any system call because it would take the peer domain's
    /// mapped pages past the budget the operator set.
    #[error(
        "mapping {pages} more pages of domain {dom} would pass its budget \
         ({mapped} of {budget} pages already mapped)"
    )]
    OverBudget {
        /// The domain whose pages were to be mapped.
        dom: DomId,
        /// Pages in the refused mapping.
        pages: usize,
        /// Pages of that domain mapped at the time.
        mapped: u64,
        /// The budget.
        budget: u64,
    },
    /// The loopback domain acting has been destroyed, or ran out of memory.
    #[error("domain {domid}: {reason}")]
    Domain {
        /// The domain.
        domid: DomId,
        /// What is wrong with it.
        reason: Refusal,
    },
}

impl XenError {
    /// The errno that the equivalent Linux/Xen failure reports, where there is one: the OS
    /// error of a system call, or the errno a [`Refusal`] stands for.
    pub fn errno(&self) -> Option<i32> {
        match self {
            XenError::Open { source, .. }
            | XenError::Ioctl { source, .. }
            | XenError::Mmap { source, .. }
            | XenError::Grant { source, .. }
            | XenError::MapGrants { source, .. }
            | XenError::Bind { source, .. }
            | XenError::Port { source, .. }
            | XenError::ForeignMapBatch { source, .. }
            | XenError::ForeignMap { source, .. } => source.raw_os_error(),
            XenError::Pinned { source, .. } => source.as_ref().and_then(io::Error::raw_os_error),
            XenError::Invalid { .. } => Some(libc::EINVAL),
            XenError::OverBudget { .. } => Some(libc::ENOSPC),
            XenError::CopySegment { .. } => Some(libc::EIO),
            XenError::GrantRefused { reason, .. }
            | XenError::EventRefused { reason, .. }
            | XenError::ForeignRefused { reason, .. }
            | XenError::Domain { reason, .. } => Some(reason.errno()),
        }
    }

    /// The refusal, for errors of the loopback platform.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            XenError::GrantRefused { reason, .. }
            | XenError::EventRefused { reason, .. }
            | XenError::ForeignRefused { reason, .. }
            | XenError::Domain { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// Why the loopback platform refused an operation. Each variant is a check that Xen (or the
/// Linux driver in front of it) makes, and [`Refusal::errno`] is the error that reaches user
/// space there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The reference was never allocated in the granting domain's table (`GNTST_bad_gntref`).
    #[error("no such grant reference")]
    NoSuchGrant,
    /// The reference was allocated and has since been revoked (`GNTST_general_error`).
    #[error("the grant was revoked")]
    Revoked,
    /// The reference grants access to another domain (`GNTST_general_error`).
    #[error("the grant is for domain {grantee}")]
    NotGrantedTo {
        /// The domain the page is granted to.
        grantee: DomId,
    },
    /// A read-write mapping or a copy into a read-only grant (`GNTST_general_error`).
    #[error("the grant is read-only")]
    ReadOnlyGrant,
    /// The granting or target domain does not exist (`GNTST_bad_domain`, `ESRCH`).
    #[error("domain {domid} does not exist")]
    NoSuchDomain {
        /// The missing domain.
        domid: DomId,
    },
    /// The domain has been destroyed.
    #[error("domain {domid} has been destroyed")]
    Destroyed {
        /// The dead domain.
        domid: DomId,
    },
    /// Only Dom0 may map other domains' memory by frame number (`EPERM`).
    #[error("only domain 0 may map foreign memory")]
    NotPrivileged,
    /// The foreign mapper was restricted to another domain (`EPERM`).
    #[error("the mapper is restricted to domain {to}")]
    Restricted {
        /// The domain the handle is restricted to.
        to: DomId,
    },
    /// The event-channel handle is restricted (`IOCTL_EVTCHN_RESTRICT_DOMID`) and the
    /// operation is not a bind to that domain, or it is a second restriction (`EACCES`).
    #[error("the event-channel handle is restricted to domain {to}")]
    PortRestricted {
        /// The domain the handle is restricted to.
        to: DomId,
    },
    /// The frame number is outside the domain's memory (`EINVAL` in `err[]`).
    #[error("no such frame")]
    NoSuchFrame,
    /// The port is not bound through this handle (`ENOTCONN`).
    #[error("port {port} is not bound through this handle")]
    PortNotBound {
        /// The local port.
        port: Port,
    },
    /// The remote port does not exist or is not an unbound port offered to this domain
    /// (`EINVAL`).
    #[error("remote port {port} is not offered to this domain")]
    PortNotOffered {
        /// The remote port.
        port: Port,
    },
    /// The domain has no memory left for the request (`ENOMEM`).
    #[error("out of memory")]
    OutOfMemory,
    /// The domain's grant table or port space is full (`ENOSPC`).
    #[error("no free grant references or ports")]
    Exhausted,
}

impl Refusal {
    /// The errno that this check yields on Linux under Xen.
    pub fn errno(self) -> i32 {
        match self {
            Refusal::NoSuchGrant
            | Refusal::Revoked
            | Refusal::NotGrantedTo { .. }
            | Refusal::ReadOnlyGrant
            | Refusal::NoSuchFrame
            | Refusal::PortNotOffered { .. } => libc::EINVAL,
            Refusal::NoSuchDomain { .. } | Refusal::Destroyed { .. } => libc::ESRCH,
            Refusal::NotPrivileged | Refusal::Restricted { .. } => libc::EPERM,
            Refusal::PortNotBound { .. } => libc::ENOTCONN,
            Refusal::PortRestricted { .. } => libc::EACCES,
            Refusal::OutOfMemory => libc::ENOMEM,
            Refusal::Exhausted => libc::ENOSPC,
        }
    }

    /// The `GNTST_*` status that Xen's grant-table code returns for this check.
    pub fn grant_status(self) -> GrantStatus {
        match self {
            Refusal::NoSuchGrant => GrantStatus::BadGntref,
            Refusal::NoSuchDomain { .. } | Refusal::Destroyed { .. } => GrantStatus::BadDomain,
            Refusal::NotPrivileged | Refusal::Restricted { .. } => GrantStatus::PermissionDenied,
            _ => GrantStatus::GeneralError,
        }
    }
}

/// A Xen grant-table status (`GNTST_*` in `xen/interface/grant_table.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantStatus {
    /// `GNTST_okay` (0).
    Okay,
    /// `GNTST_general_error` (-1).
    GeneralError,
    /// `GNTST_bad_domain` (-2).
    BadDomain,
    /// `GNTST_bad_gntref` (-3).
    BadGntref,
    /// `GNTST_bad_handle` (-4).
    BadHandle,
    /// `GNTST_bad_virt_addr` (-5).
    BadVirtAddr,
    /// `GNTST_bad_dev_addr` (-6).
    BadDevAddr,
    /// `GNTST_no_device_space` (-7).
    NoDeviceSpace,
    /// `GNTST_permission_denied` (-8).
    PermissionDenied,
    /// `GNTST_bad_page` (-9).
    BadPage,
    /// `GNTST_bad_copy_arg` (-10).
    BadCopyArg,
    /// `GNTST_address_too_big` (-11).
    AddressTooBig,
    /// `GNTST_eagain` (-12).
    Eagain,
    /// A status this crate does not know.
    Other(i16),
}

impl GrantStatus {
    /// Decodes a raw status.
    pub fn from_raw(raw: i16) -> Self {
        match raw {
            0 => GrantStatus::Okay,
            -1 => GrantStatus::GeneralError,
            -2 => GrantStatus::BadDomain,
            -3 => GrantStatus::BadGntref,
            -4 => GrantStatus::BadHandle,
            -5 => GrantStatus::BadVirtAddr,
            -6 => GrantStatus::BadDevAddr,
            -7 => GrantStatus::NoDeviceSpace,
            -8 => GrantStatus::PermissionDenied,
            -9 => GrantStatus::BadPage,
            -10 => GrantStatus::BadCopyArg,
            -11 => GrantStatus::AddressTooBig,
            -12 => GrantStatus::Eagain,
            other => GrantStatus::Other(other),
        }
    }

    /// The raw status.
    pub fn raw(self) -> i16 {
        match self {
            GrantStatus::Okay => 0,
            GrantStatus::GeneralError => -1,
            GrantStatus::BadDomain => -2,
            GrantStatus::BadGntref => -3,
            GrantStatus::BadHandle => -4,
            GrantStatus::BadVirtAddr => -5,
            GrantStatus::BadDevAddr => -6,
            GrantStatus::NoDeviceSpace => -7,
            GrantStatus::PermissionDenied => -8,
            GrantStatus::BadPage => -9,
            GrantStatus::BadCopyArg => -10,
            GrantStatus::AddressTooBig => -11,
            GrantStatus::Eagain => -12,
            GrantStatus::Other(raw) => raw,
        }
    }

    fn text(self) -> &'static str {
        match self {
            GrantStatus::Okay => "okay",
            GrantStatus::GeneralError => "undefined error",
            GrantStatus::BadDomain => "unrecognised domain id",
            GrantStatus::BadGntref => "invalid grant reference",
            GrantStatus::BadHandle => "invalid mapping handle",
            GrantStatus::BadVirtAddr => "invalid virtual address",
            GrantStatus::BadDevAddr => "invalid device address",
            GrantStatus::NoDeviceSpace => "no spare translation slot in the I/O MMU",
            GrantStatus::PermissionDenied => "permission denied",
            GrantStatus::BadPage => "bad page",
            GrantStatus::BadCopyArg => "copy arguments cross page boundary",
            GrantStatus::AddressTooBig => "page address size too large",
            GrantStatus::Eagain => "operation not done; try again",
            GrantStatus::Other(_) => "unknown status",
        }
    }
}

impl std::fmt::Display for GrantStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status {} ({})", self.raw(), self.text())
    }
}

/// An `io::Error` carrying `errno`.
pub(crate) fn os_error(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_status_round_trips() {
        for raw in -14i16..=1 {
            assert_eq!(GrantStatus::from_raw(raw).raw(), raw);
        }
        assert_eq!(GrantStatus::from_raw(-3), GrantStatus::BadGntref);
        assert_eq!(
            GrantStatus::BadCopyArg.to_string(),
            "status -10 (copy arguments cross page boundary)"
        );
    }

    #[test]
    fn messages_name_what_failed_without_repeating_the_source() {
        let e = XenError::Open {
            path: "/dev/xen/gntdev",
            module: "xen-gntdev",
            source: os_error(libc::ENOENT),
        };
        assert_eq!(
            e.to_string(),
            "cannot open /dev/xen/gntdev; load the xen-gntdev kernel module if it is missing"
        );
        assert_eq!(e.errno(), Some(libc::ENOENT));
        let e = XenError::GrantRefused {
            mapper: 1,
            peer: 2,
            gref: 9,
            reason: Refusal::NotGrantedTo { grantee: 3 },
        };
        assert_eq!(
            e.to_string(),
            "domain 1 cannot use ref 9 of domain 2: the grant is for domain 3"
        );
        assert_eq!(e.errno(), Some(libc::EINVAL));
        assert_eq!(e.refusal(), Some(Refusal::NotGrantedTo { grantee: 3 }));
        let e = XenError::ForeignMap {
            dom: 5,
            index: 2,
            gfn: 0x1234,
            count: 4,
            source: os_error(libc::EBUSY),
        };
        assert_eq!(
            e.to_string(),
            "foreign mapping of gfn 0x1234 (page 2 of 4) of domain 5 failed"
        );
    }
}
