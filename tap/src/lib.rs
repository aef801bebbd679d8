//! TAP interfaces (`/dev/net/tun`, `Documentation/networking/tuntap.rst`) and the few link
//! operations around them: the MTU, the MAC address, up, and a port of a bridge. Both halves of
//! xenvirtio's virtio-net use it: the backend makes one TAP per device in Dom0 and adds it to
//! the operator's bridge, and the frontend on a guest without VDUSE makes the guest's interface
//! a TAP that it bridges to the virtqueues.
//!
//! Every TAP here is `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` with a 12-byte header
//! (`struct virtio_net_hdr_v1`): a read gives one frame behind its header, a write takes one. A
//! new TAP has no offload enabled; [`Tap::set_offload`] enables checksum offload
//! ([`OFFLOAD_CSUM`]), after which the kernel may hand over frames with a partial checksum
//! (`NEEDS_CSUM` in the header). What a header from the other side may ask for is checked by the
//! device model and the driver, not here.
//!
//! The interface is not persistent: closing the descriptor removes it, and with it its bridge
//! port. Every ioctl and the one `read`/`write` live behind the small wrappers below.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The virtio-net header size the TAP is told to use (`TUNSETVNETHDRSZ`).
pub const VNET_HDR_SIZE: usize = 12;
/// The longest interface name, without its NUL (`IFNAMSIZ - 1`).
pub const MAX_NAME: usize = libc::IFNAMSIZ - 1;

/// `TUN_F_CSUM` for [`Tap::set_offload`]: frames may come with a partial checksum.
pub const OFFLOAD_CSUM: u32 = libc::TUN_F_CSUM;

/// `SIOCBRADDIF` (`include/uapi/linux/sockios.h`): make an interface a port of a bridge.
const SIOCBRADDIF: u32 = 0x89a2;

/// Whether `name` is a usable interface name: 1 to [`MAX_NAME`] of `a-z A-Z 0-9 . - _`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// Why an interface name is refused.
fn check_name(name: &str) -> io::Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "'{name}' is not an interface name (1 to {MAX_NAME} of a-z, A-Z, 0-9, '.', '-', '_')"
            ),
        ))
    }
}

/// An `ifreq` naming `name`, with a zeroed argument.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    check_name(name)?;
    // SAFETY: `ifreq` is plain data (a name array and a union of integers, sockaddrs and a
    // pointer); all zeros is a valid value of each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

/// `ioctl(fd, request, &mut ifreq)`.
fn ifreq_ioctl(fd: BorrowedFd<'_>, request: u32, req: &mut libc::ifreq) -> io::Result<()> {
    // The request type is `unsigned long` in glibc and `int` in musl: `as` keeps the bits of
    // these small numbers in both.
    // SAFETY: every request passed here (TUNSETIFF, SIOC[GS]IF*, SIOCBRADDIF) reads and writes
    // at most one `struct ifreq`, and `req` is a valid, exclusive one for the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            request as libc::Ioctl,
            std::ptr::from_mut(req),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A socket for the link ioctls (any family reaches the device ioctls; `ip` and `ifconfig` use
/// an IPv4 datagram socket).
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; it returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A TAP interface; dropping it removes the interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the TAP `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte header). The
    /// descriptor is non-blocking when `nonblocking`. Fails with `EBUSY` if an interface of that
    /// name exists, `EPERM` without `CAP_NET_ADMIN`.
    pub fn create(name: &str, nonblocking: bool) -> io::Result<Tap> {
        let mut req = ifreq(name)?;
        let flags = if nonblocking { libc::O_NONBLOCK } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open /dev/net/tun: {e}")))?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ifreq_ioctl(file.as_fd(), libc::TUNSETIFF as u32, &mut req)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create TAP {name}: {e}")))?;
        let size: libc::c_int = VNET_HDR_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` from the pointer, which points at `size`.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ as libc::Ioctl,
                std::ptr::from_ref(&size),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel may have changed the name (a `%d` template): take the one it chose.
        // SAFETY: the kernel NUL-terminates `ifr_name` within IFNAMSIZ.
        let chosen = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) };
        let tap = Tap {
            file,
            name: chosen.to_string_lossy().into_owned(),
        };
        // No offload until asked: the kernel hands over only complete, checksummed frames.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads the reader takes (`TUNSETOFFLOAD`, `TUN_F_*`: [`OFFLOAD_CSUM`] or 0).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument (the offload flags) by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as libc::Ioctl,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads one frame, behind its header, into `buf`. A frame longer than `buf` is cut.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_packet(self.file.as_fd(), buf)
    }

    /// Writes one frame, behind its header.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        write_packet(self.file.as_fd(), frame)
    }
}

/// One `read(2)` of a descriptor that keeps packet boundaries (a TAP, a `SOCK_SEQPACKET` or
/// `SOCK_DGRAM` socket): one packet into `buf`, cut at its length. Retried on `EINTR`.
pub fn read_packet(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: read(2) writes at most `buf.len()` bytes into `buf`, valid and writable.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `write(2)` of a whole packet to such a descriptor. Retried on `EINTR`.
pub fn write_packet(fd: BorrowedFd<'_>, packet: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: write(2) reads at most `packet.len()` bytes from `packet`, valid memory.
        let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether the interface `name` exists.
pub fn exists(name: &str) -> bool {
    check_name(name).is_ok() && Path::new("/sys/class/net").join(name).exists()
}

/// Whether the interface `name` is a bridge.
pub fn is_bridge(name: &str) -> bool {
    check_name(name).is_ok()
        && Path::new("/sys/class/net")
            .join(name)
            .join("bridge")
            .exists()
}

/// The bridge `name` is a port of, if any.
pub fn master(name: &str) -> Option<String> {
    check_name(name).ok()?;
    let link = std::fs::read_link(Path::new("/sys/class/net").join(name).join("master")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Brings the interface up (`IFF_UP`), leaving its other flags.
pub fn set_up(name: &str) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    ifreq_ioctl(sock.as_fd(), libc::SIOCGIFFLAGS as u32, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled `ifru_flags`.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as i16;
    ifreq_ioctl(sock.as_fd(), libc::SIOCSIFFLAGS as u32, &mut req)
}

/// Sets the interface's MTU.
pub fn set_mtu(name: &str, mtu: u16) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    ifreq_ioctl(sock.as_fd(), libc::SIOCSIFMTU as u32, &mut req)
}

/// Sets the interface's Ethernet address.
pub fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: all zeros is a valid `sockaddr`.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in addr.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = addr;
    ifreq_ioctl(sock.as_fd(), libc::SIOCSIFHWADDR as u32, &mut req)
}

/// The interface's index.
pub fn index(name: &str) -> io::Result<i32> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    ifreq_ioctl(sock.as_fd(), libc::SIOCGIFINDEX as u32, &mut req)?;
    // SAFETY: SIOCGIFINDEX filled `ifru_ifindex`.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex })
}

/// Makes `port` a port of the bridge `bridge` (what `ip link set PORT master BRIDGE` does).
pub fn bridge_add(bridge: &str, port: &str) -> io::Result<()> {
    if !is_bridge(bridge) {
        let what = if exists(bridge) {
            "is not a bridge"
        } else {
            "does not exist"
        };
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{bridge} {what} (create it with 'ip link add {bridge} type bridge')"),
        ));
    }
    let ifindex = index(port)?;
    let sock = control_socket()?;
    let mut req = ifreq(bridge)?;
    req.ifr_ifru.ifru_ifindex = ifindex;
    ifreq_ioctl(sock.as_fd(), SIOCBRADDIF, &mut req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_ioctl() {
        for bad in ["", "a/b", "sixteen-chars-xx", "a b", "x\0"] {
            let e = ifreq(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        let req = ifreq("xvn5.0").unwrap();
        assert_eq!(
            req.ifr_name[..7],
            [b'x', b'v', b'n', b'5', b'.', b'0', 0].map(|b| b as libc::c_char)
        );
        assert!(!exists("no-such-if0"));
        assert!(!is_bridge("lo"));
        assert!(exists("lo"));
        assert_eq!(master("lo"), None);
        let e = bridge_add("no-such-br0", "lo").unwrap_err();
        assert!(e.to_string().contains("no-such-br0 does not exist"), "{e}");
        let e = bridge_add("lo", "lo").unwrap_err();
        assert!(e.to_string().contains("lo is not a bridge"), "{e}");
    }

    /// A real TAP: created, configured, its frames readable; removed when dropped. Without
    /// `CAP_NET_ADMIN` (not root) the creation must fail with the permission error instead.
    #[test]
    fn a_tap_is_created_configured_and_removed() {
        let name = format!("xvt{}", std::process::id() % 100_000);
        // SAFETY: geteuid(2) has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let tap = match Tap::create(&name, true) {
            Ok(t) => t,
            Err(e) if !root => {
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                return;
            }
            Err(e) => panic!("root cannot create a TAP: {e}"),
        };
        assert_eq!(tap.name(), name);
        assert!(exists(&name));
        set_mtu(&name, 1400).unwrap();
        set_mac(&name, [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap();
        set_up(&name).unwrap();
        let sys = Path::new("/sys/class/net").join(&name);
        assert_eq!(
            std::fs::read_to_string(sys.join("mtu")).unwrap().trim(),
            "1400"
        );
        assert_eq!(
            std::fs::read_to_string(sys.join("address")).unwrap().trim(),
            "fe:ff:ff:ff:ff:ff"
        );
        assert!(index(&name).unwrap() > 0);
        tap.set_offload(OFFLOAD_CSUM).unwrap();
        tap.set_offload(0).unwrap();
        // Nothing was sent: a non-blocking read has no frame.
        let mut buf = [0u8; 64];
        let e = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(
            Tap::create(&name, true).is_err(),
            "a second TAP of one name"
        );
        drop(tap);
        assert!(!exists(&name), "the TAP outlived its descriptor");
    }

    #[test]
    fn ioctl_numbers_match_the_header() {
        // _IOW('T', 202, int) and _IOW('T', 216, int).
        assert_eq!(libc::TUNSETIFF as u32, 0x4004_54ca);
        assert_eq!(libc::TUNSETVNETHDRSZ as u32, 0x4004_54d8);
        assert_eq!(SIOCBRADDIF, 0x89a2);
    }
}
