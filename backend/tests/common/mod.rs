//! A world for the backend's tests: a loopback hypervisor, an in-memory xenstore, a daemon in
//! Dom0, and helpers to create guests, images and devices.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use xenvirtio_backend::daemon::{Daemon, DaemonConfig, DaemonHandle, RunningDaemon};
use xenvirtio_backend::stats::DeviceStats;
use xenvirtio_backend::test_utils::{
    FrontendOptions, TestDevice, TestFrontend, TestStrategy, attach,
};
use xenvirtio_xen::DomId;
use xenvirtio_xen::loopback::{LoopbackDomain, LoopbackXen};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{MemStore, TxId, XenStore};

/// Installs a test subscriber once (`RUST_LOG=debug cargo test` shows the daemon's events).
pub fn logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

pub struct World {
    pub hv: LoopbackXen,
    pub xs: MemStore,
    pub dom0: Arc<dyn XenStore>,
    pub daemon: Option<RunningDaemon>,
    pub dir: tempfile::TempDir,
    pub config: DaemonConfig,
}

impl World {
    pub fn new() -> World {
        Self::with_config(DaemonConfig::default())
    }

    /// A world whose daemon runs with `config` (its shutdown grace shortened to 500 ms unless
    /// the test chose one, so that tests ending on a device in Closing end fast).
    pub fn with_config(config: DaemonConfig) -> World {
        Self::with_loopback(config, xenvirtio_xen::loopback::LoopbackConfig::default())
    }

    /// [`World::with_config`] over a loopback hypervisor configured as `loopback`.
    pub fn with_loopback(
        mut config: DaemonConfig,
        loopback: xenvirtio_xen::loopback::LoopbackConfig,
    ) -> World {
        logs();
        if config.shutdown_grace == DaemonConfig::default().shutdown_grace {
            config.shutdown_grace = Duration::from_millis(500);
        }
        let hv = LoopbackXen::with_config(loopback);
        let xs = MemStore::new();
        let dom0: Arc<dyn XenStore> = Arc::new(xs.connect(0).unwrap());
        dom0.write_str(TxId::NONE, "/local/domain/0/domid", "0")
            .unwrap();
        let mut w = World {
            hv,
            xs,
            dom0,
            daemon: None,
            dir: tempfile::tempdir().unwrap(),
            config,
        };
        w.start_daemon();
        w
    }

    pub fn start_daemon(&mut self) {
        let store: Arc<dyn XenStore> = Arc::new(self.xs.connect(0).unwrap());
        let d = Daemon::new(self.hv.domain(0), store, self.config.clone())
            .unwrap()
            .spawn()
            .unwrap();
        self.daemon = Some(d);
    }

    pub fn stop_daemon(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop().unwrap();
        }
    }

    pub fn handle(&self) -> &DaemonHandle {
        self.daemon.as_ref().unwrap().handle()
    }

    /// Creates guest `domid` and returns its xenstore connection.
    pub fn guest(&self, domid: DomId) -> Arc<dyn XenStore> {
        if !self
            .xs
            .connect(0)
            .unwrap()
            .is_domain_introduced(domid)
            .unwrap()
        {
            self.xs.start_guest(domid).unwrap();
            self.dom0
                .write_str(
                    TxId::NONE,
                    &format!("/local/domain/{domid}/name"),
                    &format!("guest{domid}"),
                )
                .unwrap();
        }
        Arc::new(self.xs.connect(domid).unwrap())
    }

    /// An image of `sectors` sectors filled with a pattern.
    pub fn image(&self, name: &str, sectors: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let data: Vec<u8> = (0..sectors * 512)
            .map(|i| (i * 7 + i / 512) as u8)
            .collect();
        std::fs::write(&path, data).unwrap();
        path
    }

    pub fn attach(&self, frontend: DomId, devid: u32, dev: &TestDevice) {
        self.guest(frontend);
        attach(&*self.dom0, 0, frontend, devid, dev).unwrap();
    }

    pub fn connect(
        &self,
        frontend: DomId,
        devid: u32,
        opts: FrontendOptions,
    ) -> TestFrontend<LoopbackDomain> {
        TestFrontend::connect(
            self.hv.domain(frontend),
            self.guest(frontend),
            0,
            devid,
            opts,
        )
        .unwrap_or_else(|e| panic!("connecting {frontend}/{devid} failed: {}", chain(&e)))
    }

    pub fn backend_state(&self, frontend: DomId, devid: u32) -> Option<XenbusState> {
        let bdir = xenbus::backend_dir(0, frontend, devid);
        xenbus::read_state(&*self.dom0, TxId::NONE, &xenbus::state_path(&bdir)).ok()
    }

    pub fn wait_backend_state(&self, frontend: DomId, devid: u32, want: XenbusState) {
        let bdir = xenbus::backend_dir(0, frontend, devid);
        xenbus::wait_for_state(
            &*self.dom0,
            &xenbus::state_path(&bdir),
            |s| s == want,
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("waiting for {frontend}/{devid} to reach {want}: {e}"));
    }

    pub fn device_stats(&self, frontend: DomId, devid: u32) -> Option<DeviceStats> {
        self.handle().device(frontend, devid)
    }

    /// The device's statistics once `ready` holds for them (a device thread publishes its
    /// counters right after the batch that the frontend already saw completed).
    pub fn stats_when(
        &self,
        frontend: DomId,
        devid: u32,
        ready: impl Fn(&DeviceStats) -> bool,
    ) -> DeviceStats {
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.device_stats(frontend, devid);
            if let Some(s) = &s {
                if ready(s) {
                    return s.clone();
                }
            }
            if Instant::now() > deadline {
                panic!("statistics of {frontend}/{devid} never got ready: {last:?}");
            }
            last = s;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The live mappings dom0 holds of `owner`'s memory.
    pub fn live_maps_of(&self, owner: DomId) -> usize {
        self.hv
            .records()
            .into_iter()
            .filter(|r| r.mapper == 0 && r.owner == owner && r.live)
            .count()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop();
        }
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

pub fn options(strategy: TestStrategy) -> FrontendOptions {
    FrontendOptions::new(strategy)
}

/// The device to attach for `strategy` (direct needs `grant_usage = 0`).
pub fn for_strategy(dev: TestDevice, strategy: TestStrategy) -> TestDevice {
    if strategy == TestStrategy::Direct {
        dev.without_grant_usage()
    } else {
        dev
    }
}

pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}
