//! The boundary between xenvirtio's device code and the Xen devices of the kernel.
//!
//! Frontend and backend code is generic over [`Platform`]: the real implementation opens
//! `/dev/xen/{gntalloc,gntdev,evtchn,privcmd}` ([`crate::linux`]), and the loopback platform
//! ([`crate::loopback`]) implements the same traits in one process with several "domains" for
//! unit tests, the no-Xen try-out and benchmarks. Nothing outside this crate issues an ioctl or
//! an mmap of a Xen device.
//!
//! Every handle is RAII: dropping a grant revokes it, dropping a mapping unmaps it, dropping a
//! port unbinds it. Memory is only ever reached through [`SharedMem`].

use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::XenError;
use crate::mem::{PAGE_SIZE, SharedMem};

/// A Xen domain id.
pub type DomId = u16;
/// A grant reference in the granting domain's grant table.
pub type GrantRef = u32;
/// A local event-channel port.
pub type Port = u32;
/// A guest frame number: the guest-physical address shifted right by 12.
pub type Gfn = u64;

/// The access a grant or a mapping allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// The peer may only read.
    ReadOnly,
    /// The peer may read and write.
    ReadWrite,
}

impl Access {
    /// Whether writes are allowed.
    pub fn writable(self) -> bool {
        self == Access::ReadWrite
    }
}

/// What the kernel does when this side lets go of shared pages, however that happens (a drop, a
/// close, a crash): the `*_SET_UNMAP_NOTIFY` ioctls of gntalloc and gntdev. The peer learns of it
/// without a message from this side.
///
/// - On granted pages ([`GrantedPages`]), it fires when this domain releases the grant (the
///   value is dropped or the process dies).
/// - On a grant mapping ([`GrantMapping`]), it fires when the mapping is unmapped. Clearing a
///   byte needs a read-write mapping (gntdev refuses it on a read-only one).
///
/// Each grant or mapping holds one notification; arming again replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnmapNotify {
    /// Byte offset, from the start of the grant or mapping, of a byte to clear to zero.
    pub clear_byte: Option<usize>,
    /// Local event-channel port (bound through this domain's [`EventChannels`]) whose peer is
    /// notified. The kernel keeps the port bound until the notification has been sent, even if
    /// it is unbound or its handle closed before that.
    pub event: Option<Port>,
}

/// Pages of this domain granted to a peer (gntalloc). Dropping the value revokes the grants;
/// a page the peer still maps is freed by the kernel only once the peer unmaps it.
pub trait GrantedPages: Send + Sync {
    /// The grant references, one per page, in page order.
    fn refs(&self) -> &[GrantRef];
    /// Number of pages granted.
    fn pages(&self) -> usize {
        self.refs().len()
    }
    /// This domain's own (always writable) view of the pages.
    fn mem(&self) -> SharedMem<'_>;
    /// Arms an unmap notification.
    fn set_unmap_notify(&mut self, notify: UnmapNotify) -> Result<(), XenError>;
}

/// Allocates grants of this domain's pages to peers.
pub trait GrantAllocator: Send + Sync {
    /// The grants handed out (owned values, so they can be kept behind a trait object).
    type Grant: GrantedPages + 'static;
    /// Allocates `pages` zeroed pages and grants them to `peer` with `access`.
    fn grant(&self, peer: DomId, pages: usize, access: Access) -> Result<Self::Grant, XenError>;
}

/// A peer's pages mapped into this process (gntdev or privcmd). Dropping it unmaps them.
pub trait MappedPages: Send + Sync {
    /// The mapped pages, contiguous, read-only unless mapped [`Access::ReadWrite`].
    fn mem(&self) -> SharedMem<'_>;
    /// Number of pages mapped.
    fn pages(&self) -> usize {
        self.mem().len() / PAGE_SIZE
    }
}

/// A mapping of a peer's grants (gntdev), which can also notify the peer when it goes away.
pub trait GrantMapping: MappedPages {
    /// Arms an unmap notification (`IOCTL_GNTDEV_SET_UNMAP_NOTIFY`).
    fn set_unmap_notify(&mut self, notify: UnmapNotify) -> Result<(), XenError>;
}

/// One segment of a grant copy: `len` bytes between a peer's granted page and local memory.
#[derive(Debug)]
pub enum GrantCopy<'a> {
    /// Copy from the peer's page into `dst`.
    FromGrant {
        /// Granting domain.
        peer: DomId,
        /// Grant reference.
        gref: GrantRef,
        /// Byte offset inside the granted page.
        offset: u16,
        /// Destination; its length is the segment length.
        dst: &'a mut [u8],
    },
    /// Copy `src` into the peer's page.
    ToGrant {
        /// Granting domain.
        peer: DomId,
        /// Grant reference.
        gref: GrantRef,
        /// Byte offset inside the granted page.
        offset: u16,
        /// Source; its length is the segment length.
        src: &'a [u8],
    },
}

impl GrantCopy<'_> {
    /// The granting domain and the ref this segment touches.
    pub fn target(&self) -> (DomId, GrantRef) {
        match self {
            GrantCopy::FromGrant { peer, gref, .. } | GrantCopy::ToGrant { peer, gref, .. } => {
                (*peer, *gref)
            }
        }
    }

    /// Byte offset inside the granted page.
    pub fn offset(&self) -> u16 {
        match self {
            GrantCopy::FromGrant { offset, .. } | GrantCopy::ToGrant { offset, .. } => *offset,
        }
    }

    /// Length of the segment in bytes.
    pub fn len(&self) -> usize {
        match self {
            GrantCopy::FromGrant { dst, .. } => dst.len(),
            GrantCopy::ToGrant { src, .. } => src.len(),
        }
    }

    /// Whether the segment copies nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Refuses segments that cross the end of their granted page, before anything is copied
/// (gntdev would fail the whole ioctl with EINVAL part-way through).
pub(crate) fn validate_copy(segments: &[GrantCopy<'_>]) -> Result<(), XenError> {
    for (i, seg) in segments.iter().enumerate() {
        let (offset, len) = (seg.offset(), seg.len());
        if usize::from(offset).saturating_add(len) > PAGE_SIZE {
            return Err(XenError::Invalid {
                what: format!("grant copy segment {i}"),
                why: format!("{len} bytes at offset {offset} cross the end of the granted page"),
            });
        }
    }
    Ok(())
}

/// Maps grants of peer domains (gntdev).
pub trait GrantMapper: Send + Sync {
    /// The mappings handed out.
    type Mapping: GrantMapping;
    /// Maps `refs`, all granted by `peer`, contiguously and in one batch. With
    /// [`Access::ReadOnly`] the pages are mapped `PROT_READ` and cannot be written.
    fn map(
        &self,
        peer: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<Self::Mapping, XenError>;
    /// Performs grant copies in batches. A segment must not cross its page (the whole call then
    /// fails with [`XenError::Invalid`] before anything is copied). The outer error is the
    /// ioctl's; the inner ones are each segment's Xen status, one per segment, in order.
    fn copy(&self, segments: &mut [GrantCopy<'_>]) -> Result<Vec<Result<(), XenError>>, XenError>;
}

/// Event channels of one process handle (one open of `/dev/xen/evtchn`).
///
/// The file descriptor becomes readable when a bound port is pending: register it with a mio
/// `Poll` through `mio::unix::SourceFd`. A port delivered by [`EventChannels::pending`] stays
/// masked until [`EventChannels::unmask`] (the evtchn `read()`/`write()` protocol).
pub trait EventChannels: Send + Sync + AsRawFd {
    /// Allocates a port that `remote` may bind to.
    fn bind_unbound(&self, remote: DomId) -> Result<Port, XenError>;
    /// Binds to `remote_port` of `remote`; returns the local port.
    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port, XenError>;
    /// Unbinds a local port.
    fn unbind(&self, port: Port) -> Result<(), XenError>;
    /// Signals the other end of `port`.
    fn notify(&self, port: Port) -> Result<(), XenError>;
    /// Drains the pending ports without blocking; each is left masked.
    fn pending(&self) -> Result<Vec<Port>, XenError>;
    /// Unmasks ports delivered by [`EventChannels::pending`].
    fn unmask(&self, ports: &[Port]) -> Result<(), XenError>;
    /// Restricts this handle, for good, to `dom` (`IOCTL_EVTCHN_RESTRICT_DOMID`): from now on
    /// it can only bind interdomain channels offered by `dom` (no unbound ports, no VIRQs);
    /// ports already bound keep working. Linux refuses a second restriction and domain 0
    /// (`EACCES`, `EINVAL`), so call it once, with a guest's domid.
    fn restrict(&self, dom: DomId) -> Result<(), XenError>;
}

/// Maps any page of a peer by its guest frame number (privcmd). Only Dom0 may do this.
pub trait ForeignMapper: Send + Sync {
    /// The mappings handed out.
    type Mapping: MappedPages;
    /// Maps `gfns` of `dom` contiguously. Fails if any page fails; the error names the first
    /// failing index.
    fn map(&self, dom: DomId, gfns: &[Gfn], access: Access) -> Result<Self::Mapping, XenError>;
    /// Restricts this handle, for good, to mapping memory of `dom` (`IOCTL_PRIVCMD_RESTRICT`).
    /// Restricting again to the same domain is a no-op; to another one, an error.
    fn restrict(&self, dom: DomId) -> Result<(), XenError>;
}

/// Memory of this domain whose guest frame numbers are known and stable: what the `direct`
/// DMA strategy hands to the backend as raw guest-physical addresses.
pub trait PinnedPages: Send + Sync {
    /// This domain's view of the memory.
    fn mem(&self) -> SharedMem<'_>;
    /// The frame number of each 4 KiB page, in order.
    fn gfns(&self) -> &[Gfn];
    /// Whether the kernel may still move these pages to other frames (compaction, NUMA
    /// balancing, hot-unplug): true for the mlock'ed 4 KiB fallback, whose frame numbers can
    /// change under a backend that maps them. Memory that cannot move returns false.
    fn may_migrate(&self) -> bool {
        false
    }
}

/// Allocates [`PinnedPages`].
pub trait PinnedAllocator: Send + Sync {
    /// The memory handed out (owned values, so they can be kept behind a trait object).
    type Pinned: PinnedPages + 'static;
    /// Allocates `pages` 4 KiB pages of pinned memory.
    fn alloc_pinned(&self, pages: usize) -> Result<Self::Pinned, XenError>;
}

/// One way of reaching the Xen devices, for one domain.
pub trait Platform: Send + Sync + 'static {
    /// Grants out.
    type GrantAlloc: GrantAllocator;
    /// Grants in.
    type GrantMap: GrantMapper;
    /// Event channels.
    type Events: EventChannels;
    /// Foreign mapping.
    type Foreign: ForeignMapper;
    /// Pinned memory for `direct`.
    type Pinned: PinnedAllocator;

    /// The domain this platform acts as.
    fn domid(&self) -> DomId;
    /// Opens a grant allocator.
    fn grant_allocator(&self) -> Result<Self::GrantAlloc, XenError>;
    /// Opens a grant mapper.
    fn grant_mapper(&self) -> Result<Self::GrantMap, XenError>;
    /// Opens an event-channel handle.
    fn event_channels(&self) -> Result<Self::Events, XenError>;
    /// Opens a foreign mapper.
    fn foreign_mapper(&self) -> Result<Self::Foreign, XenError>;
    /// Opens a pinned-memory allocator.
    fn pinned_allocator(&self) -> Result<Self::Pinned, XenError>;
}

/// A local event-channel port that is unbound when dropped.
///
/// It shares the [`EventChannels`] handle it was bound through, so the handle (and its file
/// descriptor, registered in the caller's poll) outlives every port bound on it.
pub struct BoundPort<E: EventChannels> {
    events: Arc<E>,
    port: Port,
}

impl<E: EventChannels> BoundPort<E> {
    /// Allocates a port that `remote` may bind to ([`EventChannels::bind_unbound`]).
    pub fn bind_unbound(events: &Arc<E>, remote: DomId) -> Result<Self, XenError> {
        let port = events.bind_unbound(remote)?;
        Ok(Self {
            events: Arc::clone(events),
            port,
        })
    }

    /// Binds to `remote_port` of `remote` ([`EventChannels::bind_interdomain`]).
    pub fn bind_interdomain(
        events: &Arc<E>,
        remote: DomId,
        remote_port: Port,
    ) -> Result<Self, XenError> {
        let port = events.bind_interdomain(remote, remote_port)?;
        Ok(Self {
            events: Arc::clone(events),
            port,
        })
    }

    /// Takes ownership of a port already bound through `events`.
    pub fn adopt(events: &Arc<E>, port: Port) -> Self {
        Self {
            events: Arc::clone(events),
            port,
        }
    }

    /// The local port.
    pub fn port(&self) -> Port {
        self.port
    }

    /// Signals the other end.
    pub fn notify(&self) -> Result<(), XenError> {
        self.events.notify(self.port)
    }

    /// The handle the port is bound through.
    pub fn events(&self) -> &Arc<E> {
        &self.events
    }

    /// Gives the port up without unbinding it.
    pub fn into_port(self) -> Port {
        let port = self.port;
        std::mem::forget(self);
        port
    }
}

impl<E: EventChannels> std::fmt::Debug for BoundPort<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundPort")
            .field("port", &self.port)
            .finish()
    }
}

impl<E: EventChannels> Drop for BoundPort<E> {
    fn drop(&mut self) {
        if let Err(e) = self.events.unbind(self.port) {
            tracing::debug!(port = self.port, error = %e, "unbinding an event-channel port failed");
        }
    }
}
