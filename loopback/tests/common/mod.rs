//! A world for the pair tests: a [`Pair`] with a short shutdown grace, a temp dir for images,
//! and helpers to attach and connect devices and to wait for conditions.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use xenvirtio_backend::admin::{AttachRequest, DmaSetting};
use xenvirtio_backend::daemon::{DaemonConfig, DomainSelector};
use xenvirtio_frontend::blk::{BlkDevice, BlkOptions};
use xenvirtio_frontend::{ConnectOptions, Frontend};
use xenvirtio_loopback::pair::Pair;
use xenvirtio_loopback::role::RoleName;
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_xen::DomId;
use xenvirtio_xen::loopback::{LoopbackConfig, LoopbackDomain};
use xenvirtio_xenstore::TxId;
use xenvirtio_xenstore::xenbus::{self, XenbusState};

/// Installs a test subscriber once (`RUST_LOG=debug cargo test` shows both ends' events).
pub fn logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// The four ways a frontend hands memory to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    GrantPerRequest,
    GrantPersistent,
    Bounce,
    Direct,
}

pub const STRATEGIES: [Strategy; 4] = [
    Strategy::GrantPerRequest,
    Strategy::GrantPersistent,
    Strategy::Bounce,
    Strategy::Direct,
];

impl Strategy {
    pub fn dma(self) -> DmaStrategy {
        match self {
            Strategy::GrantPerRequest | Strategy::GrantPersistent => DmaStrategy::Grant,
            Strategy::Bounce => DmaStrategy::Bounce,
            Strategy::Direct => DmaStrategy::Direct,
        }
    }

    pub fn persistent(self) -> bool {
        self == Strategy::GrantPersistent
    }

    pub fn connect(self) -> ConnectOptions {
        ConnectOptions {
            dma: Some(self.dma()),
            persistent: self.persistent(),
            timeout: Duration::from_secs(10),
            ..ConnectOptions::default()
        }
    }

    pub fn blk(self) -> BlkOptions {
        BlkOptions {
            connect: self.connect(),
            io_timeout: Some(Duration::from_secs(20)),
            ..BlkOptions::default()
        }
    }
}

/// The guest most tests use: an x86 PVH DomU, which may use every strategy here.
pub const GUEST: RoleName = RoleName::X86Pvh;
/// Another guest domain.
pub const OTHER: DomId = 2;

pub struct World {
    pub pair: Pair,
    pub dir: tempfile::TempDir,
}

impl World {
    /// A pair whose daemon trusts domains 1, 2 and 10 to 19 with `direct` (not 3).
    pub fn new() -> World {
        logs();
        let config = DaemonConfig {
            allow_direct: [1, OTHER]
                .into_iter()
                .chain(10..20)
                .map(DomainSelector::Id)
                .collect(),
            shutdown_grace: Duration::from_millis(2000),
            restart_timeout: Duration::from_secs(5),
            ..DaemonConfig::default()
        };
        let pair = Pair::start(LoopbackConfig::default(), config).unwrap();
        World {
            pair,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// An image of `bytes` bytes filled with a pattern that differs in every sector.
    pub fn image(&self, name: &str, bytes: usize) -> PathBuf {
        let path = self.dir.path().join(name);
        let data: Vec<u8> = (0..bytes)
            .map(|i| (i.wrapping_mul(7) ^ (i >> 9)) as u8)
            .collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    pub fn guest(&self, domid: DomId) {
        self.pair
            .add_guest(domid, &format!("guest{domid}"))
            .unwrap();
    }

    /// Attaches a blk device over `image` for `domid` and returns its devid.
    pub fn attach_blk(&self, domid: DomId, image: &Path, queues: Option<u32>) -> u32 {
        self.guest(domid);
        let mut req = AttachRequest::blk(domid, image);
        req.queues = queues;
        req.dma = DmaSetting::Auto;
        self.pair.attach(&req).unwrap().devid
    }

    /// [`World::attach_blk`] for a test that gives one image to a device per round while the
    /// devices of earlier rounds stay attached: `force-share`, since those still hold the
    /// image (the locks themselves are tested in `nbd_tools.rs` and the backend's tests).
    pub fn attach_blk_again(&self, domid: DomId, image: &Path, queues: Option<u32>) -> u32 {
        self.guest(domid);
        let mut req = AttachRequest::blk(domid, image);
        req.queues = queues;
        req.force_share = true;
        self.pair.attach(&req).unwrap().devid
    }

    pub fn frontend(&self, role: RoleName) -> Frontend<LoopbackDomain> {
        self.guest(role.domid());
        self.pair.frontend(role.role()).unwrap()
    }

    pub fn frontend_as(&self, role: RoleName, domid: DomId) -> Frontend<LoopbackDomain> {
        self.guest(domid);
        let mut r = role.role();
        r.domid = domid;
        self.pair.frontend(r).unwrap()
    }

    pub fn connect_blk(
        &self,
        fe: &Frontend<LoopbackDomain>,
        devid: u32,
        strategy: Strategy,
    ) -> BlkDevice<LoopbackDomain> {
        fe.connect_blk(devid, &strategy.blk())
            .unwrap_or_else(|e| panic!("{strategy:?}: connecting blk {devid}: {}", chain(&e)))
    }

    pub fn backend_state(&self, domid: DomId, devid: u32) -> Option<XenbusState> {
        let bdir = xenbus::backend_dir(0, domid, devid);
        xenbus::read_state(
            self.pair.toolstack(),
            TxId::NONE,
            &xenbus::state_path(&bdir),
        )
        .ok()
    }

    pub fn frontend_state(&self, domid: DomId, devid: u32) -> Option<XenbusState> {
        let fdir = xenbus::frontend_dir(domid, devid);
        xenbus::read_state(
            self.pair.toolstack(),
            TxId::NONE,
            &xenbus::state_path(&fdir),
        )
        .ok()
    }
}

/// Polls `f` until it is true or 10 s pass.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An error and its sources, on one line.
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

pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Bytes that differ from the image's initial pattern everywhere.
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0xa5)
        .collect()
}
