//! A real xenstored for one test: Debian's C xenstored 4.17 under the LD_PRELOAD shim of
//! `tests/xenstored-host/`, serving a socket in a temporary folder of its own.
//!
//! This module owns starting the daemon (building the shim once per machine and source
//! version), acting as the toolstack and as "the hypervisor" for it (creating guest rings,
//! introducing and killing domains), and killing it when the test ends. A missing daemon or
//! compiler is a test failure that says to run `scripts/install-deps.sh`, never a skip.

use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use xenvirtio_xenstore::{DomId, Perm, TxId, XenStore, XsClient};

use crate::ring_bridge::RingBridge;

/// Where Debian's xen-utils-4.17 installs the daemon; `XENVIRTIO_XENSTORED` overrides it.
pub const DEFAULT_XENSTORED: &str = "/usr/lib/xen-4.17/bin/xenstored";

const SHIM_SOURCE: &str = include_str!("../xenstored-host/xsdshim.c");
const INSTALL_HINT: &str =
    "run scripts/install-deps.sh (it installs xenstore-utils xen-utils-4.17 libxen-dev)";

/// The event-channel port the shim reserves for VIRQ_DOM_EXC (a domain changed state).
const VIRQ_DOM_EXC_PORT: u32 = 1;

fn xenstored_binary() -> PathBuf {
    let path = std::env::var_os("XENVIRTIO_XENSTORED")
        .map_or_else(|| PathBuf::from(DEFAULT_XENSTORED), PathBuf::from);
    if !path.is_file() {
        panic!(
            "Debian's xenstored is not installed at {}: {INSTALL_HINT}",
            path.display()
        );
    }
    path
}

/// Builds the shim once per source version; concurrent test processes race safely (each
/// compiles to a private name and renames into place).
fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let mut h = std::hash::DefaultHasher::new();
        SHIM_SOURCE.hash(&mut h);
        let dir = std::env::temp_dir().join(format!("xenvirtio-xsdshim-{:016x}", h.finish()));
        let so = dir.join("libxsdshim.so");
        if so.is_file() {
            return so;
        }
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {} failed: {e}", dir.display()));
        let src = dir.join(format!("xsdshim-{}.c", std::process::id()));
        let tmp = dir.join(format!("libxsdshim.so.{}", std::process::id()));
        fs::write(&src, SHIM_SOURCE).unwrap_or_else(|e| panic!("writing {} failed: {e}", src.display()));
        let out = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&tmp)
            .arg(&src)
            .arg("-ldl")
            .output()
            .unwrap_or_else(|e| panic!("running gcc to build the xenstored shim failed ({e}): {INSTALL_HINT}"));
        if !out.status.success() {
            panic!(
                "building the xenstored shim failed (are libxen-dev's headers installed? {INSTALL_HINT}):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        fs::rename(&tmp, &so).unwrap_or_else(|e| panic!("installing {} failed: {e}", so.display()));
        let _ = fs::remove_file(&src);
        so
    })
}

/// An error with its sources, for panic messages.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// One running xenstored, killed on drop.
#[derive(Debug)]
pub struct Xenstored {
    dir: tempfile::TempDir,
    child: Option<Child>,
    socket: PathBuf,
}

impl Xenstored {
    /// Starts a daemon in a fresh temporary folder and waits for its socket.
    pub fn start() -> Xenstored {
        let binary = xenstored_binary();
        let shim = shim();
        let dir = tempfile::Builder::new()
            .prefix("xenvirtio-xenstored-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating a temporary folder failed: {e}"));
        let log = File::create(dir.path().join("out.log"))
            .unwrap_or_else(|e| panic!("creating out.log failed: {e}"));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicating the log fd failed: {e}"));
        let child = Command::new(&binary)
            .arg("-N")
            .env("XSD_SHIM_DIR", dir.path())
            .env("XENSTORED_RUNDIR", dir.path())
            .env("LD_PRELOAD", shim)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {} failed ({e}): {INSTALL_HINT}", binary.display())
            });
        let socket = dir.path().join("socket");
        let mut xsd = Xenstored {
            dir,
            child: Some(child),
            socket,
        };
        // The socket file appears at bind(), before listen(): wait until a connect works.
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&xsd.socket).is_err() {
            if let Some(status) = xsd.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "xenstored exited with {status} before serving its socket; its log:\n{}",
                    xsd.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "xenstored did not accept on {} within 10 s; its log:\n{}",
                    xsd.socket.display(),
                    xsd.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        xsd
    }

    /// The folder the daemon and the shim share.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's socket (what `XENSTORED_PATH` should name).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir().join("out.log")).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the daemon is running until kill() or drop")
    }

    /// A privileged (dom0) client over the socket.
    pub fn client(&self) -> XsClient {
        XsClient::connect_socket(&self.socket)
            .unwrap_or_else(|e| panic!("connecting to the test xenstored failed: {}", chain(&e)))
    }

    /// One of Debian's `xenstore-*` tools, pointed at this daemon.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(name);
        c.env("XENSTORED_PATH", &self.socket);
        c
    }

    /// Stops the daemon with SIGSTOP: requests then wait, in flight.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pids fit in pid_t");
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is our
        // own child, which has not been reaped, so it cannot be a recycled pid.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            r,
            0,
            "kill({pid}, {sig}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Kills the daemon (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Does what a toolstack does for a new guest: the domain exists (its ring file),
    /// `/local/domain/<domid>` belongs to it, and it is introduced (`XS_INTRODUCE`).
    pub fn add_guest(&self, domid: DomId) {
        let ring = self.dir().join(format!("ring-{domid}"));
        fs::write(&ring, [0u8; 4096])
            .unwrap_or_else(|e| panic!("creating {} failed: {e}", ring.display()));
        let dom0 = self.client();
        let home = format!("/local/domain/{domid}");
        dom0.mkdir(TxId::NONE, &home)
            .unwrap_or_else(|e| panic!("{e}"));
        dom0.set_perms(TxId::NONE, &home, &[Perm::owner(domid)])
            .unwrap_or_else(|e| panic!("{e}"));
        dom0.introduce_domain(domid, 0, 1)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A client the daemon sees as guest `domid` (added with [`add_guest`](Self::add_guest)),
    /// through a ring bridge; keep the bridge alive as long as the client.
    pub fn guest_client(&self, domid: DomId) -> (RingBridge, XsClient) {
        let bridge = RingBridge::start(self.dir(), domid);
        let client = XsClient::connect_socket(bridge.socket_path()).unwrap_or_else(|e| {
            panic!(
                "connecting to the ring bridge of domain {domid} failed: {}",
                chain(&e)
            )
        });
        (bridge, client)
    }

    /// Makes a domain die as the hypervisor would report it, and tells the daemon to look
    /// (VIRQ_DOM_EXC): it then releases the domain and fires `@releaseDomain`.
    pub fn kill_domain(&self, domid: DomId) {
        File::create(self.dir().join(format!("dead-{domid}")))
            .unwrap_or_else(|e| panic!("marking {domid} dead failed: {e}"));
        self.kick(VIRQ_DOM_EXC_PORT);
    }

    /// Writes a port number to the shim's event-channel FIFO.
    pub fn kick(&self, port: u32) {
        let fifo = self.dir().join("evtchn");
        let mut f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap_or_else(|e| panic!("opening {} failed: {e}", fifo.display()));
        f.write_all(&port.to_le_bytes())
            .unwrap_or_else(|e| panic!("kicking port {port} failed: {e}"));
    }
}

impl Drop for Xenstored {
    fn drop(&mut self) {
        self.kill();
    }
}
