//! A bridge from a unix socket to a guest's xenstore ring, so that the crate's own socket
//! client is seen by xenstored as guest domain N, with that guest's permissions and quotas.
//!
//! This module owns the guest side of `struct xenstore_domain_interface` (Xen's `xs_wire.h`):
//! requests go into `req[]` and advance `req_prod`; replies and watch events are taken from
//! `rsp[]` and advance `rsp_cons`. The ring is the shim's file `DIR/ring-N`, shared with the
//! daemon's mmap; it is accessed with `pread`/`pwrite`, so no memory is mapped here. The
//! daemon is kicked through the shim's `DIR/evtchn` FIFO and notifies through
//! `DIR/notify-N`, with a short poll timeout as a fallback. One client at a time, as one
//! guest has one ring; the bridge never parses the messages it carries.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use xenvirtio_xenstore::DomId;

/// `XENSTORE_RING_SIZE`.
const RING_SIZE: u32 = 1024;
const REQ: u64 = 0;
const RSP: u64 = 1024;
const REQ_CONS: u64 = 2048;
const REQ_PROD: u64 = 2052;
const RSP_CONS: u64 = 2056;
const RSP_PROD: u64 = 2060;
/// The shim binds guest N's event channel to local port 1000 + N.
const PORT_BASE: u32 = 1000;
/// Fallback poll period, in case a notification is missed.
const POLL_MS: i32 = 2;

/// A running bridge; stopped and joined on drop.
#[derive(Debug)]
pub struct RingBridge {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RingBridge {
    /// Starts bridging `DIR/ring-<domid>` to a new socket in `shim_dir`.
    pub fn start(shim_dir: &Path, domid: DomId) -> RingBridge {
        let socket = shim_dir.join(format!("guest-{domid}.sock"));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .unwrap_or_else(|e| panic!("binding {} failed: {e}", socket.display()));
        let ring = Ring::open(shim_dir, domid);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("ring-bridge-{domid}"))
                .spawn(move || serve(listener, ring, &stop))
                .unwrap_or_else(|e| panic!("spawning the ring bridge failed: {e}"))
        };
        RingBridge {
            socket,
            stop,
            thread: Some(thread),
        }
    }

    /// The socket a client connects to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }
}

impl Drop for RingBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Ring {
    page: File,
    kick: File,
    notify: File,
    port: u32,
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("temporary paths contain no NUL");
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.kind(),
            ErrorKind::AlreadyExists,
            "mkfifo {} failed: {e}",
            path.display()
        );
    }
}

impl Ring {
    fn open(dir: &Path, domid: DomId) -> Ring {
        let path = dir.join(format!("ring-{domid}"));
        let page = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening the ring {} failed: {e}", path.display()));
        let kick = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(dir.join("evtchn"))
            .unwrap_or_else(|e| panic!("opening the shim's evtchn FIFO failed: {e}"));
        let notify_path = dir.join(format!("notify-{domid}"));
        mkfifo(&notify_path);
        let notify = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&notify_path)
            .unwrap_or_else(|e| panic!("opening {} failed: {e}", notify_path.display()));
        Ring {
            page,
            kick,
            notify,
            port: PORT_BASE + u32::from(domid),
        }
    }

    fn get(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.page
            .read_exact_at(&mut b, off)
            .expect("the ring file is 4096 bytes long");
        u32::from_le_bytes(b)
    }

    fn set(&self, off: u64, v: u32) {
        self.page
            .write_all_at(&v.to_le_bytes(), off)
            .expect("the ring file is writable");
    }

    fn kick(&self) {
        // A full FIFO already holds kicks the daemon will see.
        let _ = (&self.kick).write(&self.port.to_le_bytes());
    }

    /// Puts as much of `data` as fits into the request ring; returns how much.
    fn send(&self, data: &[u8]) -> usize {
        let mut sent = 0;
        while sent < data.len() {
            let (cons, prod) = (self.get(REQ_CONS), self.get(REQ_PROD));
            let used = prod.wrapping_sub(cons);
            assert!(
                used <= RING_SIZE,
                "the daemon corrupted the request ring indexes"
            );
            let space = RING_SIZE - used;
            if space == 0 {
                break;
            }
            let at = prod % RING_SIZE;
            let n = (space.min(RING_SIZE - at) as usize).min(data.len() - sent);
            self.page
                .write_all_at(&data[sent..sent + n], REQ + u64::from(at))
                .expect("the ring file is writable");
            self.set(REQ_PROD, prod.wrapping_add(n as u32));
            sent += n;
        }
        if sent > 0 {
            self.kick();
        }
        sent
    }

    /// Takes what the daemon has put in the response ring.
    fn recv(&self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let (cons, prod) = (self.get(RSP_CONS), self.get(RSP_PROD));
            let avail = prod.wrapping_sub(cons);
            assert!(
                avail <= RING_SIZE,
                "the daemon corrupted the response ring indexes"
            );
            if avail == 0 {
                break;
            }
            let at = cons % RING_SIZE;
            let n = avail.min(RING_SIZE - at);
            let mut buf = vec![0u8; n as usize];
            self.page
                .read_exact_at(&mut buf, RSP + u64::from(at))
                .expect("the ring file is 4096 bytes long");
            out.extend_from_slice(&buf);
            self.set(RSP_CONS, cons.wrapping_add(n));
        }
        if !out.is_empty() {
            self.kick();
        }
        out
    }

    fn drain_notifications(&self) {
        let mut buf = [0u8; 256];
        while matches!((&self.notify).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Waits until one of `fds` is readable or `POLL_MS` passes; returns which are readable.
fn poll_readable(fds: &[RawFd]) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid, initialised array of `pfds.len()` pollfd structs that lives
    // across the call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, POLL_MS) };
    if r < 0 {
        return vec![false; fds.len()];
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

fn serve(listener: UnixListener, ring: Ring, stop: &AtomicBool) {
    listener
        .set_nonblocking(true)
        .expect("a listening socket can be made non-blocking");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => bridge(client, &ring, stop),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                poll_readable(&[listener.as_raw_fd()]);
            }
            Err(_) => return,
        }
    }
}

/// Carries bytes both ways until the client leaves or the bridge stops.
fn bridge(mut client: UnixStream, ring: &Ring, stop: &AtomicBool) {
    client
        .set_nonblocking(true)
        .expect("a connected socket can be made non-blocking");
    let mut to_ring: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut client_open = true;
    while !stop.load(Ordering::Relaxed) {
        poll_readable(&[client.as_raw_fd(), ring.notify.as_raw_fd()]);
        ring.drain_notifications();
        while client_open {
            match client.read(&mut buf) {
                Ok(0) => client_open = false,
                Ok(n) => to_ring.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => client_open = false,
            }
        }
        if !to_ring.is_empty() {
            let n = ring.send(&to_ring);
            to_ring.drain(..n);
        }
        let out = ring.recv();
        if !out.is_empty() && client_open && write_all_nonblocking(&mut client, &out, stop).is_err()
        {
            client_open = false;
        }
        if !client_open {
            return;
        }
    }
}

fn write_all_nonblocking(
    client: &mut UnixStream,
    mut data: &[u8],
    stop: &AtomicBool,
) -> std::io::Result<()> {
    while !data.is_empty() {
        match client.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
