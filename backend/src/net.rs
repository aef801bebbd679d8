//! The virtio-net device model (virtio 1.2 section 5.1): one queue pair, no control queue, no
//! offloads. Frames go between the guest's queues and the host side of the device, a TAP in
//! Dom0 (a port of the operator's bridge, as netback's `vifD.N` is) or a `SOCK_SEQPACKET`
//! socket (one frame per packet, for user-space switches and tests).
//!
//! Both sides exchange frames behind a 12-byte `virtio_net_hdr_v1`. What the guest may send is
//! checked before anything is mapped or handed on, and a frame that breaks a rule is dropped and
//! counted, never a fatal error:
//! - a transmit chain longer than the header plus [`net::max_frame`] (`too_long`); nothing of
//!   it is mapped;
//! - a header that asks for what was not negotiated (`offload`): a segmentation offload (none is
//!   offered), `DATA_VALID` (a driver never sets it), or a partial checksum (`NEEDS_CSUM`)
//!   without `CSUM` or whose place lies outside the frame;
//! - a chain with no frame behind its header, or shorter than an Ethernet header (`no_data`);
//! - a transmit chain with device-writable buffers (`malformed`).
//!
//! And in the other direction: a receive buffer too small for the waiting frame is returned
//! empty (`rx_small_buffer`; the frame is dropped, the driver counts a length error), and a
//! frame from the host side longer than the guest's MTU allows is dropped (`rx_too_long`). A
//! frame from the host side with a partial checksum (Linux hands a TAP reader such frames, with
//! `NEEDS_CSUM` in its header) keeps it for a guest that negotiated `GUEST_CSUM`, and has it
//! completed here for one that did not: a guest never gets a frame with a checksum it cannot
//! check.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use xenvirtio_tap::Tap;
use xenvirtio_virtio::features::{self, net as nf};
use xenvirtio_virtio::net::{
    self, ETH_HLEN, GSO_NONE, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, HDR_SIZE, MacAddr, NetConfig,
    NetHeader,
};
use xenvirtio_xen::mem::SharedMem;

use crate::chain_io::{ChainReader, ChainWriter};

/// The address the Dom0 side of every TAP takes, as netback gives its `vif`s: the bridge then
/// never takes it as its own.
pub const HOST_SIDE_MAC: [u8; 6] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff];

/// Where a net device's frames go on the host side (`link` key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetLink {
    /// A TAP named `name`, added to `bridge` when one is named.
    Tap {
        /// The TAP's name (`vifname`, else `xvn<domid>.<devid>`).
        name: String,
        /// The bridge it becomes a port of.
        bridge: Option<String>,
    },
    /// A `SOCK_SEQPACKET` unix socket the backend connects to (`socket:<path>`).
    Socket(PathBuf),
}

/// What the toolstack gave a net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetTarget {
    /// The guest's MAC address (`mac`).
    pub mac: MacAddr,
    /// The MTU offered (`mtu`).
    pub mtu: u16,
    /// The host side.
    pub link: NetLink,
}

/// Why a net device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NetOpenError {
    /// Creating or configuring the TAP failed.
    #[error("cannot set up TAP {name}: {what}")]
    Tap {
        /// The TAP's name.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Connecting to the socket failed.
    #[error("cannot connect to the frame socket {}", path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Why one frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetDrop {
    /// A transmit chain longer than a header and the largest frame.
    TooLong,
    /// A header that asks for an offload the device did not offer.
    Offload,
    /// No frame, or less than an Ethernet header, behind the header.
    NoData,
    /// A transmit chain with device-writable buffers.
    Malformed,
    /// A receive buffer too small for the frame.
    RxSmallBuffer,
    /// A frame from the host side longer than the guest's MTU allows.
    RxTooLong,
    /// A frame from the host side the guest cannot be given as it is: a segmentation offload,
    /// or a partial checksum whose place lies outside it.
    RxOffload,
    /// The host side refused the frame (its queue is full, or it is gone).
    HostRefused,
}

/// What a net device counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames handed to the guest, and their bytes (without the header).
    pub rx_frames: u64,
    /// Bytes of them.
    pub rx_bytes: u64,
    /// Frames taken from the guest and handed to the host side.
    pub tx_frames: u64,
    /// Bytes of them.
    pub tx_bytes: u64,
    /// Dropped: [`NetDrop::TooLong`].
    pub too_long: u64,
    /// Dropped: [`NetDrop::Offload`].
    pub offload: u64,
    /// Dropped: [`NetDrop::NoData`].
    pub no_data: u64,
    /// Dropped: [`NetDrop::Malformed`].
    pub malformed: u64,
    /// Dropped: [`NetDrop::RxSmallBuffer`].
    pub rx_small_buffer: u64,
    /// Dropped: [`NetDrop::RxTooLong`].
    pub rx_too_long: u64,
    /// Dropped: [`NetDrop::RxOffload`].
    pub rx_offload: u64,
    /// Dropped: [`NetDrop::HostRefused`].
    pub host_refused: u64,
}

impl NetCounters {
    /// Every frame dropped, for any reason.
    pub fn dropped(&self) -> u64 {
        self.too_long
            + self.offload
            + self.no_data
            + self.malformed
            + self.rx_small_buffer
            + self.rx_too_long
            + self.rx_offload
            + self.host_refused
    }

    fn count(&mut self, why: NetDrop) {
        // The first few drops of a device are logged with their reason, then only counted.
        if self.dropped() < 8 {
            tracing::info!(reason = ?why, "net frame dropped");
        }
        let c = match why {
            NetDrop::TooLong => &mut self.too_long,
            NetDrop::Offload => &mut self.offload,
            NetDrop::NoData => &mut self.no_data,
            NetDrop::Malformed => &mut self.malformed,
            NetDrop::RxSmallBuffer => &mut self.rx_small_buffer,
            NetDrop::RxTooLong => &mut self.rx_too_long,
            NetDrop::RxOffload => &mut self.rx_offload,
            NetDrop::HostRefused => &mut self.host_refused,
        };
        *c += 1;
    }
}

/// The host side's descriptor.
#[derive(Debug)]
enum Endpoint {
    Tap(Tap),
    Socket(OwnedFd),
}

impl Endpoint {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Endpoint::Tap(t) => t.as_fd(),
            Endpoint::Socket(s) => s.as_fd(),
        }
    }
}

/// The address of the unix socket at `path` (std has no `SOCK_SEQPACKET` sockets to give one).
pub(crate) fn unix_addr(path: &Path) -> io::Result<libc::sockaddr_un> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: all zeros is a valid `sockaddr_un`.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long or holds a NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(addr)
}

/// Connects a non-blocking `SOCK_SEQPACKET` socket to `path`.
fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let addr = unix_addr(path)?;
    // SAFETY: socket(2) with constant arguments; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid `sockaddr_un` of the size passed.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// One packet from `fd` into `buf`; `Ok(None)` when none is waiting. A packet longer than
/// `buf` is cut (the caller sizes `buf` one byte over the longest packet it accepts).
fn recv_packet(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match xenvirtio_tap::read_packet(fd, buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// The net device.
#[derive(Debug)]
pub struct NetDevice {
    endpoint: Endpoint,
    mac: MacAddr,
    mtu: u16,
    counters: NetCounters,
    /// One packet: header and frame, one byte over the longest accepted.
    buf: Vec<u8>,
    /// A frame from the host side read into `buf` and not yet delivered: its packet length.
    pending: Option<usize>,
    /// The features the driver accepted (0 before a connection).
    negotiated: u64,
}

impl NetDevice {
    /// Opens the host side: creates the TAP (Dom0 side address [`HOST_SIDE_MAC`], the MTU, a
    /// port of the bridge, up) or connects the socket.
    pub fn open(target: &NetTarget) -> Result<NetDevice, NetOpenError> {
        let endpoint = match &target.link {
            NetLink::Tap { name, bridge } => {
                let step = |what: &'static str| {
                    move |source| NetOpenError::Tap {
                        name: name.clone(),
                        what,
                        source,
                    }
                };
                let tap = Tap::create(name, true).map_err(step("creating it"))?;
                let name = tap.name();
                xenvirtio_tap::set_mac(name, HOST_SIDE_MAC).map_err(step("setting its address"))?;
                xenvirtio_tap::set_mtu(name, target.mtu).map_err(step("setting its MTU"))?;
                if let Some(b) = bridge {
                    xenvirtio_tap::bridge_add(b, name).map_err(step("adding it to the bridge"))?;
                }
                xenvirtio_tap::set_up(name).map_err(step("bringing it up"))?;
                Endpoint::Tap(tap)
            }
            NetLink::Socket(path) => {
                Endpoint::Socket(connect_seqpacket(path).map_err(|source| {
                    NetOpenError::Socket {
                        path: path.clone(),
                        source,
                    }
                })?)
            }
        };
        Ok(NetDevice::with_endpoint(endpoint, target.mac, target.mtu))
    }

    /// A device whose host side is `socket`, a connected socket that keeps packet boundaries
    /// (`SOCK_SEQPACKET`, `SOCK_DGRAM`), such as one end of a socket pair a switch handed over.
    /// It is made non-blocking.
    pub fn over_socket(socket: OwnedFd, mac: MacAddr, mtu: u16) -> io::Result<NetDevice> {
        let fd = socket.as_raw_fd();
        // SAFETY: fcntl(2) F_GETFL on a descriptor we own; no pointer is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl(2) F_SETFL on a descriptor we own, with an integer argument.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NetDevice::with_endpoint(Endpoint::Socket(socket), mac, mtu))
    }

    fn with_endpoint(endpoint: Endpoint, mac: MacAddr, mtu: u16) -> NetDevice {
        NetDevice {
            endpoint,
            mac,
            mtu,
            counters: NetCounters::default(),
            buf: vec![0; HDR_SIZE + net::max_frame(mtu) + 1],
            pending: None,
            negotiated: 0,
        }
    }

    /// The TAP's name, if the host side is one.
    pub fn tap_name(&self) -> Option<&str> {
        match &self.endpoint {
            Endpoint::Tap(t) => Some(t.name()),
            Endpoint::Socket(_) => None,
        }
    }

    /// The features offered: checksum offload both ways, the MAC, the MTU and the link status.
    pub fn features(&self) -> u64 {
        features::bit(nf::CSUM)
            | features::bit(nf::GUEST_CSUM)
            | features::bit(nf::MAC)
            | features::bit(nf::MTU)
            | features::bit(nf::STATUS)
    }

    /// The features the driver of a new connection accepted: what its headers may ask for.
    pub fn set_negotiated(&mut self, negotiated: u64) {
        self.negotiated = negotiated;
    }

    /// The configuration space: the MAC, link up, one queue pair, the MTU.
    pub fn config(&self) -> Vec<u8> {
        NetConfig {
            mac: self.mac.0,
            status: net::STATUS_LINK_UP,
            max_virtqueue_pairs: 1,
            mtu: self.mtu,
        }
        .to_bytes()
        .to_vec()
    }

    /// What was counted.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Registers the host side's descriptor for readability (edge-triggered: the device thread
    /// reads until nothing is left or no receive buffer is).
    pub fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&self.endpoint.fd().as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    /// The most chain bytes a transmit request may have: a header and the largest frame.
    pub fn tx_cap(&self) -> u32 {
        // `max_frame` of a u16 MTU plus 12 fits a u32.
        (HDR_SIZE + net::max_frame(self.mtu)) as u32
    }

    /// Checks a transmit chain by its lengths alone, before anything is mapped. A refusal is
    /// counted.
    pub fn check_tx(&mut self, readable_len: u32, writable_len: u32) -> Result<(), NetDrop> {
        let r = if writable_len > 0 {
            Err(NetDrop::Malformed)
        } else if readable_len > self.tx_cap() {
            Err(NetDrop::TooLong)
        } else if (readable_len as usize) < HDR_SIZE + ETH_HLEN {
            Err(NetDrop::NoData)
        } else {
            Ok(())
        };
        if let Err(why) = r {
            self.counters.count(why);
        }
        r
    }

    /// Hands the frame of a mapped transmit chain (checked by [`Self::check_tx`]) to the host
    /// side. A refusal is counted.
    pub fn transmit(&mut self, readable: &[SharedMem<'_>]) -> Result<(), NetDrop> {
        let r = self.transmit_inner(readable);
        if let Err(why) = r {
            self.counters.count(why);
        }
        r
    }

    fn transmit_inner(&mut self, readable: &[SharedMem<'_>]) -> Result<(), NetDrop> {
        let mut reader = ChainReader::new(readable);
        let len = reader.remaining();
        if len > self.tx_cap() as usize {
            return Err(NetDrop::TooLong);
        }
        if len < HDR_SIZE + ETH_HLEN {
            return Err(NetDrop::NoData);
        }
        let packet = &mut self.buf[..len];
        // One copy out of the guest's memory, which may change under us: the header is checked
        // on the copy.
        reader.read_exact(packet).map_err(|_| NetDrop::NoData)?;
        let mut hdr = [0u8; HDR_SIZE];
        hdr.copy_from_slice(&packet[..HDR_SIZE]);
        // The host side gets a header rebuilt from the checked fields alone: a partial
        // checksum's place (under `CSUM`), or nothing.
        let allowed = if features::has(self.negotiated, nf::CSUM) {
            HDR_F_NEEDS_CSUM
        } else {
            0
        };
        let clean = NetHeader::from_bytes(&hdr)
            .checked(allowed, len - HDR_SIZE)
            .ok_or(NetDrop::Offload)?;
        packet[..HDR_SIZE].copy_from_slice(&clean.to_bytes());
        xenvirtio_tap::write_packet(self.endpoint.fd(), packet).map_err(|e| {
            tracing::debug!(error = %e, "the host side refused a frame");
            NetDrop::HostRefused
        })?;
        self.counters.tx_frames += 1;
        self.counters.tx_bytes += (len - HDR_SIZE) as u64;
        Ok(())
    }

    /// The length, header included, of the next frame from the host side, reading one if none
    /// is pending; `Ok(None)` when none is waiting. Frames too long for the guest are dropped
    /// and counted on the way.
    pub fn next_frame(&mut self) -> io::Result<Option<usize>> {
        if let Some(n) = self.pending {
            return Ok(Some(n));
        }
        let limit = HDR_SIZE + net::max_frame(self.mtu);
        loop {
            let Some(n) = recv_packet(self.endpoint.fd(), &mut self.buf)? else {
                return Ok(None);
            };
            if n > limit {
                if self.counters.rx_too_long < 4 {
                    let h = NetHeader::from_bytes(
                        self.buf[..HDR_SIZE].try_into().expect("a header's bytes"),
                    );
                    tracing::info!(
                        len = n,
                        gso_type = h.gso_type,
                        flags = h.flags,
                        "frame from the host side over the MTU"
                    );
                }
                self.counters.count(NetDrop::RxTooLong);
                continue;
            }
            if n < HDR_SIZE + ETH_HLEN {
                // Not a frame (a runt from a user-space peer): nothing to deliver.
                self.counters.count(NetDrop::NoData);
                continue;
            }
            if !self.settle_received_header(n) {
                self.counters.count(NetDrop::RxOffload);
                continue;
            }
            self.pending = Some(n);
            return Ok(Some(n));
        }
    }

    /// Rewrites the header of the packet of `n` bytes in `buf` into the one the guest gets: a
    /// partial checksum passed on (`GUEST_CSUM`) or completed here, `DATA_VALID` passed on or
    /// cleared, one buffer. False for a frame the guest cannot be given (a segmentation offload,
    /// a checksum place outside the frame).
    fn settle_received_header(&mut self, n: usize) -> bool {
        let mut hdr = [0u8; HDR_SIZE];
        hdr.copy_from_slice(&self.buf[..HDR_SIZE]);
        let h = NetHeader::from_bytes(&hdr);
        if h.gso_type != GSO_NONE {
            return false;
        }
        let guest_csum = features::has(self.negotiated, nf::GUEST_CSUM);
        let mut out = NetHeader::received();
        if h.flags & HDR_F_NEEDS_CSUM != 0 {
            if guest_csum {
                if !h.csum_fits(n - HDR_SIZE) {
                    return false;
                }
                out.flags = HDR_F_NEEDS_CSUM;
                out.csum_start = h.csum_start;
                out.csum_offset = h.csum_offset;
            } else if !net::complete_checksum(
                &mut self.buf[HDR_SIZE..n],
                h.csum_start,
                h.csum_offset,
            ) {
                return false;
            }
        }
        if guest_csum && h.flags & HDR_F_DATA_VALID != 0 {
            out.flags |= HDR_F_DATA_VALID;
        }
        self.buf[..HDR_SIZE].copy_from_slice(&out.to_bytes());
        true
    }

    /// Drops the pending frame because the receive buffer offered for it is too small.
    pub fn drop_pending(&mut self) {
        if self.pending.take().is_some() {
            self.counters.count(NetDrop::RxSmallBuffer);
        }
    }

    /// Writes the pending frame, behind the device's header, into a mapped receive buffer at
    /// least [`Self::next_frame`] bytes long. Returns the bytes written.
    pub fn deliver(&mut self, writable: &[SharedMem<'_>]) -> io::Result<u32> {
        let Some(n) = self.pending else {
            return Ok(0);
        };
        // The header was settled when the frame was read (`settle_received_header`).
        let packet = &self.buf[..n];
        ChainWriter::new(writable)
            .write_all(packet)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.pending = None;
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += (n - HDR_SIZE) as u64;
        // `n` is at most a header and a frame of a u16 MTU.
        Ok(n as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenvirtio_xen::mem::PageBuf;

    /// A device over one end of a socket pair; the other end is the host side.
    fn pair(mtu: u16) -> (NetDevice, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two descriptors into `fds`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both descriptors are new and owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (
            NetDevice::with_endpoint(Endpoint::Socket(a), MacAddr::xen([1, 2, 3]), mtu),
            b,
        )
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 253) as u8).collect()
    }

    #[test]
    fn a_frame_goes_out_with_a_clean_header_and_one_comes_in() {
        let (mut dev, host) = pair(1500);
        let buf = PageBuf::new(1);
        let m = buf.mem();
        let f = frame(60);
        m.write(0, &[0u8; HDR_SIZE]).unwrap();
        m.write(HDR_SIZE, &f).unwrap();
        // The guest's num_buffers is garbage; the host side sees zeros.
        m.write(10, &[0x55, 0x55]).unwrap();
        let len = (HDR_SIZE + f.len()) as u32;
        dev.check_tx(len, 0).unwrap();
        dev.transmit(&[m.slice(0, len as usize).unwrap().read_only()])
            .unwrap();
        let mut got = [0u8; 2048];
        let n = recv_packet(host.as_fd(), &mut got).unwrap().unwrap();
        assert_eq!(&got[..HDR_SIZE], &[0u8; HDR_SIZE]);
        assert_eq!(&got[HDR_SIZE..n], &f[..]);

        assert_eq!(dev.next_frame().unwrap(), None);
        // The host side's header: DATA_VALID and a num_buffers of its own, neither of which a
        // guest without GUEST_CSUM gets.
        let mut packet = NetHeader {
            flags: net::HDR_F_DATA_VALID,
            num_buffers: 0x7777,
            ..NetHeader::default()
        }
        .to_bytes()
        .to_vec();
        packet.extend(frame(100));
        xenvirtio_tap::write_packet(host.as_fd(), &packet).unwrap();
        assert_eq!(dev.next_frame().unwrap(), Some(HDR_SIZE + 100));
        let out = PageBuf::new(1);
        let w = out.mem();
        assert_eq!(dev.deliver(&[w.slice(0, 4096).unwrap()]).unwrap(), 112);
        let hdr: [u8; HDR_SIZE] = w.read_array(0).unwrap();
        assert_eq!(NetHeader::from_bytes(&hdr), NetHeader::received());
        let mut body = vec![0u8; 100];
        w.read(HDR_SIZE, &mut body).unwrap();
        assert_eq!(body, frame(100));
        let c = dev.counters();
        assert_eq!(
            (c.tx_frames, c.tx_bytes, c.rx_frames, c.rx_bytes),
            (1, 60, 1, 100)
        );
        assert_eq!(c.dropped(), 0);
        assert_eq!(dev.config()[..6], [0, 0x16, 0x3e, 1, 2, 3]);
    }

    #[test]
    fn bad_frames_are_dropped_and_counted_by_reason() {
        let (mut dev, host) = pair(1500);
        assert_eq!(dev.check_tx(dev.tx_cap() + 1, 0), Err(NetDrop::TooLong));
        assert_eq!(dev.check_tx(HDR_SIZE as u32, 0), Err(NetDrop::NoData));
        assert_eq!(dev.check_tx(100, 1), Err(NetDrop::Malformed));
        assert_eq!(dev.check_tx(dev.tx_cap(), 0), Ok(()));
        let buf = PageBuf::new(1);
        let m = buf.mem();
        let mut hdr = NetHeader {
            flags: net::HDR_F_NEEDS_CSUM,
            ..NetHeader::default()
        };
        m.write(0, &hdr.to_bytes()).unwrap();
        let chain = [m.slice(0, 80).unwrap().read_only()];
        assert_eq!(dev.transmit(&chain), Err(NetDrop::Offload));
        hdr.flags = 0;
        hdr.gso_type = 1;
        m.write(0, &hdr.to_bytes()).unwrap();
        assert_eq!(dev.transmit(&chain), Err(NetDrop::Offload));
        let mut got = [0u8; 64];
        assert_eq!(
            recv_packet(host.as_fd(), &mut got).unwrap(),
            None,
            "nothing went out"
        );
        // From the host side: a frame over the MTU, a runt, then a good one.
        xenvirtio_tap::write_packet(host.as_fd(), &vec![0u8; HDR_SIZE + 1519]).unwrap();
        xenvirtio_tap::write_packet(host.as_fd(), &[0u8; HDR_SIZE + 5]).unwrap();
        xenvirtio_tap::write_packet(host.as_fd(), &vec![0u8; HDR_SIZE + 1518]).unwrap();
        assert_eq!(dev.next_frame().unwrap(), Some(HDR_SIZE + 1518));
        dev.drop_pending();
        assert_eq!(dev.next_frame().unwrap(), None);
        let c = dev.counters();
        assert_eq!(
            (
                c.too_long,
                c.no_data,
                c.malformed,
                c.offload,
                c.rx_too_long,
                c.rx_small_buffer
            ),
            (1, 2, 1, 2, 1, 1)
        );
        assert_eq!(c.dropped(), 8);
        assert_eq!(c.tx_frames + c.rx_frames, 0);
    }

    #[test]
    fn a_partial_checksum_from_the_host_side_is_passed_on_or_completed() {
        let (mut dev, host) = pair(1500);
        let partial = NetHeader {
            flags: HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..NetHeader::default()
        };
        let mut packet = partial.to_bytes().to_vec();
        packet.extend(frame(60));
        let out = PageBuf::new(1);
        let w = out.mem();
        // Without GUEST_CSUM: completed here, the header clean.
        xenvirtio_tap::write_packet(host.as_fd(), &packet).unwrap();
        assert_eq!(dev.next_frame().unwrap(), Some(72));
        dev.deliver(&[w.slice(0, 4096).unwrap()]).unwrap();
        let mut got = vec![0u8; 72];
        w.read(0, &mut got).unwrap();
        let mut want = packet[HDR_SIZE..].to_vec();
        assert!(net::complete_checksum(&mut want, 34, 6));
        assert_eq!(&got[HDR_SIZE..], &want[..]);
        assert_eq!(
            NetHeader::from_bytes(&got[..HDR_SIZE].try_into().unwrap()),
            NetHeader::received()
        );
        // With GUEST_CSUM: the place is passed on, the bytes untouched.
        dev.set_negotiated(features::bit(nf::GUEST_CSUM));
        xenvirtio_tap::write_packet(host.as_fd(), &packet).unwrap();
        assert_eq!(dev.next_frame().unwrap(), Some(72));
        dev.deliver(&[w.slice(0, 4096).unwrap()]).unwrap();
        w.read(0, &mut got).unwrap();
        assert_eq!(&got[HDR_SIZE..], &packet[HDR_SIZE..]);
        let h = NetHeader::from_bytes(&got[..HDR_SIZE].try_into().unwrap());
        assert_eq!(
            (h.flags, h.csum_start, h.csum_offset, h.num_buffers),
            (HDR_F_NEEDS_CSUM, 34, 6, 1)
        );
        // A place outside the frame, or a segmentation offload: dropped.
        let mut bad = NetHeader {
            csum_start: 60,
            ..partial
        }
        .to_bytes()
        .to_vec();
        bad.extend(frame(60));
        xenvirtio_tap::write_packet(host.as_fd(), &bad).unwrap();
        let mut gso = NetHeader {
            gso_type: 1,
            ..partial
        }
        .to_bytes()
        .to_vec();
        gso.extend(frame(60));
        xenvirtio_tap::write_packet(host.as_fd(), &gso).unwrap();
        assert_eq!(dev.next_frame().unwrap(), None);
        assert_eq!(dev.counters().rx_offload, 2);
    }

    #[test]
    fn a_gone_host_side_refuses_frames() {
        let (mut dev, host) = pair(1500);
        drop(host);
        let buf = PageBuf::new(1);
        let m = buf.mem();
        let chain = [m.slice(0, 80).unwrap().read_only()];
        assert_eq!(dev.transmit(&chain), Err(NetDrop::HostRefused));
        assert_eq!(dev.counters().host_refused, 1);
    }
}
