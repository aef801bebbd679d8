//! The device lifecycle of PROTOCOL.md section 8 against the in-process daemon: protocol errors
//! isolated to one device, reconnects, backend restart, frontend domain death, detach, and the
//! trust rules of `direct`.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use xenvirtio_backend::daemon::{Daemon, DaemonConfig, DomainSelector};
use xenvirtio_backend::test_utils::{
    FrontendOptions, Hostile, TestDevice, TestError, TestFrontend, TestStrategy, attach, remove,
    request_removal,
};
use xenvirtio_xen::loopback::LoopbackDomain;
use xenvirtio_xen::platform::{EventChannels, Platform};
use xenvirtio_xen::{DomId, Port, XenError};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{TxId, XenStore};

const F: DomId = 5;
const G: DomId = 6;

fn reset_frontend(w: &World, domid: DomId, devid: u32) {
    let fdir = xenbus::frontend_dir(domid, devid);
    xenbus::switch_state(&*w.guest(domid), &fdir, XenbusState::Initialising).unwrap();
}

fn expect_error(fe: &TestFrontend<LoopbackDomain>, what: &str) -> String {
    fe.wait_backend_state(|s| s == XenbusState::Closing, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{what}: the backend did not go to Closing: {e}"));
    fe.backend_error()
        .unwrap_or_else(|| panic!("{what}: no error node"))
}

#[test]
fn a_protocol_error_stops_only_that_device_and_it_can_reconnect() {
    let w = World::new();
    let img_a = w.image("a.img", 64);
    let img_b = w.image("b.img", 64);
    w.attach(F, 0, &TestDevice::blk(&img_a));
    w.attach(F, 1, &TestDevice::rng());
    w.attach(G, 0, &TestDevice::blk(&img_b));
    let mut same_domain = w.connect(F, 1, options(TestStrategy::Bounce));
    let mut other_domain = w.connect(G, 0, options(TestStrategy::GrantPersistent));

    let cases: &[(TestStrategy, Hostile, &str)] = &[
        (
            TestStrategy::GrantPerRequest,
            Hostile::WrongTag,
            "not a grant address",
        ),
        (
            TestStrategy::GrantPerRequest,
            Hostile::BadAddress,
            "cannot map",
        ),
        (
            TestStrategy::GrantPerRequest,
            Hostile::LoopingChain,
            "longer than the queue size",
        ),
        (
            TestStrategy::GrantPerRequest,
            Hostile::AvailJump,
            "ahead of the device",
        ),
        (
            TestStrategy::GrantPerRequest,
            Hostile::HeadOutOfRange,
            "outside a table",
        ),
        (
            TestStrategy::GrantPerRequest,
            Hostile::WriteIntoReadOnlyGrant,
            "read-only",
        ),
        (
            TestStrategy::GrantPersistent,
            Hostile::BadAddress,
            "cannot map",
        ),
        (
            TestStrategy::Bounce,
            Hostile::WrongTag,
            "not a bounce address",
        ),
        (TestStrategy::Bounce, Hostile::BadAddress, "outside the"),
    ];
    for (i, &(strategy, hostile, want)) in cases.iter().enumerate() {
        if i > 0 {
            reset_frontend(&w, F, 0);
        }
        let mut bad = w.connect(F, 0, options(strategy));
        bad.blk_read(0, 0, 512).unwrap();
        bad.provoke(0, hostile).unwrap();
        let error = expect_error(&bad, &format!("{hostile:?}"));
        assert!(
            error.contains(want),
            "{strategy:?} {hostile:?}: {error:?} lacks {want:?}"
        );
        // The other device of the same domain and the other domain's device go on.
        assert_eq!(same_domain.rng_read(64).unwrap().len(), 64);
        assert_eq!(
            other_domain.blk_read(0, 1, 512).unwrap(),
            read_file_range(&img_b, 512, 512)
        );
        let st = w.stats_when(F, 0, |s| s.state == "Closing");
        assert_eq!(st.last_error.as_deref(), Some(error.as_str()));
        // 8.3: the frontend closes; the backend stays Closed with its error until Sf = 1.
        bad.close().unwrap();
        assert_eq!(w.backend_state(F, 0), Some(XenbusState::Closed));
        assert_eq!(
            w.live_maps_of(F),
            2,
            "only the other device's ring and pool stay mapped"
        );
    }
    // After the last error the device is still usable once the frontend starts over.
    reset_frontend(&w, F, 0);
    let mut good = w.connect(F, 0, options(TestStrategy::GrantPerRequest));
    assert_eq!(
        good.blk_read(0, 0, 512).unwrap(),
        read_file_range(&img_a, 0, 512)
    );
    assert!(
        good.backend_error().is_none(),
        "the error node is cleared on reconnect"
    );
    good.close().unwrap();
    same_domain.close().unwrap();
    other_domain.close().unwrap();
}

#[test]
fn bogus_features_and_bad_setups_are_refused_at_connect() {
    let w = World::new();
    w.attach(F, 0, &TestDevice::rng());
    let mut opts = options(TestStrategy::GrantPerRequest);
    opts.features_override = Some((1 << 32) | (1 << 33) | (1 << 50));
    let err = TestFrontend::connect(w.hv.domain(F), w.guest(F), 0, 0, opts).unwrap_err();
    match err {
        TestError::BackendClosed { error, .. } => {
            assert!(error.contains("did not offer"), "{error}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Without ACCESS_PLATFORM although offered.
    let mut opts = options(TestStrategy::GrantPerRequest);
    opts.features_override = Some(1 << 32);
    reset_frontend(&w, F, 0);
    xenbus::switch_state(
        &*w.guest(F),
        &xenbus::frontend_dir(F, 0),
        XenbusState::Closed,
    )
    .unwrap();
    reset_frontend(&w, F, 0);
    let err = TestFrontend::connect(w.hv.domain(F), w.guest(F), 0, 0, opts).unwrap_err();
    assert!(err.to_string().contains("ACCESS_PLATFORM"), "{err}");
    assert_eq!(
        w.live_maps_of(F),
        0,
        "nothing was mapped for refused setups"
    );
}

#[test]
fn reconnect_after_the_frontend_closes() {
    let w = World::new();
    let img = w.image("r.img", 64);
    w.attach(F, 0, &TestDevice::blk(&img));
    for (round, strategy) in TestStrategy::ALL[..3].iter().cycle().take(6).enumerate() {
        let mut fe = w.connect(F, 0, options(*strategy));
        fe.blk_write(0, round as u64, &[round as u8; 512]).unwrap();
        assert_eq!(
            fe.blk_read(0, round as u64, 512).unwrap(),
            vec![round as u8; 512]
        );
        fe.close().unwrap();
        w.wait_backend_state(F, 0, XenbusState::InitWait);
        assert_eq!(w.live_maps_of(F), 0);
    }
    let generation = w
        .dom0
        .read_string(
            TxId::NONE,
            &format!("{}/config-generation", xenbus::backend_dir(0, F, 0)),
        )
        .unwrap();
    assert_eq!(
        generation, "7",
        "one publication per connection plus the last"
    );
}

#[test]
fn backend_restart_resets_a_connected_device() {
    let mut w = World::with_config(DaemonConfig {
        shutdown_grace: Duration::from_millis(200),
        ..Default::default()
    });
    let img = w.image("s.img", 64);
    w.attach(F, 0, &TestDevice::blk(&img));
    let fe = w.connect(F, 0, options(TestStrategy::GrantPersistent));
    // A clean shutdown: Closing, then Closed once the grace ran out (the test frontend does
    // not react on its own), with nothing left mapped.
    w.stop_daemon();
    assert_eq!(w.backend_state(F, 0), Some(XenbusState::Closed));
    assert_eq!(w.live_maps_of(F), 0);
    // Now as if the earlier instance had crashed while connected.
    xenbus::switch_state(
        &*w.dom0,
        &xenbus::backend_dir(0, F, 0),
        XenbusState::Connected,
    )
    .unwrap();
    w.start_daemon();
    // 8.5: the new instance resets the device; the frontend plays 8.3 and reconnects.
    w.wait_backend_state(F, 0, XenbusState::Closing);
    fe.close().unwrap();
    reset_frontend(&w, F, 0);
    let mut fe = w.connect(F, 0, options(TestStrategy::GrantPersistent));
    assert_eq!(
        fe.blk_read(0, 0, 512).unwrap(),
        read_file_range(&img, 0, 512)
    );
    fe.close().unwrap();
}

#[test]
fn backend_restart_gives_up_on_a_silent_frontend() {
    let mut w = World::with_config(DaemonConfig {
        restart_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    w.attach(F, 0, &TestDevice::rng());
    w.stop_daemon();
    let bdir = xenbus::backend_dir(0, F, 0);
    xenbus::switch_state(&*w.dom0, &bdir, XenbusState::Connected).unwrap();
    xenbus::switch_state(
        &*w.guest(F),
        &xenbus::frontend_dir(F, 0),
        XenbusState::Connected,
    )
    .unwrap();
    w.start_daemon();
    w.wait_backend_state(F, 0, XenbusState::Closing);
    w.wait_backend_state(F, 0, XenbusState::Closed);
}

#[test]
fn frontend_domain_death_releases_everything_while_others_keep_serving() {
    let w = World::new();
    let img = w.image("d.img", 64);
    let img2 = w.image("e.img", 64);
    w.attach(G, 0, &TestDevice::blk(&img2));
    let mut survivor = w.connect(G, 0, options(TestStrategy::GrantPersistent));
    survivor.blk_read(0, 0, 4096).unwrap();
    let ports_before = w.hv.stats(0).bound_ports;
    let maps_before = w.hv.stats(0).grant_maps;

    w.attach(F, 0, &TestDevice::blk(&img));
    w.attach(F, 1, &TestDevice::console());
    w.attach(F, 2, &TestDevice::rng());
    let mut a = w.connect(F, 0, options(TestStrategy::Bounce));
    let mut b = w.connect(F, 1, options(TestStrategy::GrantPerRequest));
    let mut c = w.connect(F, 2, options(TestStrategy::GrantPersistent));
    a.blk_read(0, 0, 4096).unwrap();
    b.console_write(b"x").unwrap();
    c.rng_read(16).unwrap();
    assert!(w.live_maps_of(F) > 0);

    // The domain dies: the hypervisor first, then xenstored releases it.
    w.hv.destroy(F);
    w.xs.destroy_domain(F);
    eventually("the dead domain's devices are forgotten", || {
        let s = w.handle().stats();
        s.devices.iter().all(|d| d.domid != F)
    });
    assert_eq!(
        w.live_maps_of(F),
        0,
        "nothing of the dead domain stays mapped"
    );
    assert_eq!(w.hv.stats(0).bound_ports, ports_before, "nor bound");
    assert_eq!(w.hv.stats(0).grant_maps, maps_before);
    drop((a, b, c));
    // The other domain's device never noticed.
    assert_eq!(
        survivor.blk_read(0, 2, 512).unwrap(),
        read_file_range(&img2, 1024, 512)
    );
    survivor.close().unwrap();
}

#[test]
fn online_0_detaches_the_device() {
    let w = World::new();
    let img = w.image("o.img", 64);
    w.attach(F, 0, &TestDevice::blk(&img));
    let fe = w.connect(F, 0, options(TestStrategy::GrantPerRequest));
    request_removal(&*w.dom0, 0, F, 0).unwrap();
    // The frontend follows 8.3: Closing, wait for Closed, revoke, Closed.
    fe.close().unwrap();
    eventually("the device is forgotten", || w.device_stats(F, 0).is_none());
    assert_eq!(w.backend_state(F, 0), Some(XenbusState::Closed));
    assert_eq!(w.live_maps_of(F), 0);
    remove(&*w.dom0, 0, F, 0).unwrap();
    // A silent frontend: the toolstack removes the directories; the backend lets go.
    w.attach(F, 1, &TestDevice::rng());
    let _silent = w.connect(F, 1, options(TestStrategy::GrantPerRequest));
    request_removal(&*w.dom0, 0, F, 1).unwrap();
    remove(&*w.dom0, 0, F, 1).unwrap();
    eventually("the removed device is forgotten", || {
        w.device_stats(F, 1).is_none()
    });
    assert_eq!(w.live_maps_of(F), 0);
}

#[test]
fn direct_needs_dom0_grant_usage_0_and_the_operator() {
    // Not allowed by the operator.
    let w = World::new();
    w.attach(F, 0, &TestDevice::rng().without_grant_usage());
    let err = TestFrontend::connect(
        w.hv.domain(F),
        w.guest(F),
        0,
        0,
        options(TestStrategy::Direct),
    )
    .unwrap_err();
    assert!(err.to_string().contains("--allow-direct"), "{err}");
    assert_eq!(w.hv.stats(0).foreign_maps, 0);
    // Allowed by name, but grant_usage = 1.
    let w = World::with_config(DaemonConfig {
        allow_direct: vec![DomainSelector::Name(format!("guest{F}"))],
        ..Default::default()
    });
    w.attach(F, 0, &TestDevice::rng());
    let mut opts = options(TestStrategy::Direct);
    opts.features_override = Some(1 << 32);
    let err = TestFrontend::connect(w.hv.domain(F), w.guest(F), 0, 0, opts).unwrap_err();
    assert!(err.to_string().contains("ACCESS_PLATFORM"), "{err}");
    // Allowed by name with grant_usage = 0: accepted.
    w.attach(F, 1, &TestDevice::rng().without_grant_usage());
    let mut fe = w.connect(F, 1, options(TestStrategy::Direct));
    fe.rng_read(8).unwrap();
    fe.close().unwrap();
    // Pinned to grant by the toolstack: direct is refused.
    w.attach(
        F,
        2,
        &TestDevice::rng().without_grant_usage().with_dma("grant"),
    );
    let err = TestFrontend::connect(
        w.hv.domain(F),
        w.guest(F),
        0,
        2,
        options(TestStrategy::Direct),
    )
    .unwrap_err();
    assert!(err.to_string().contains("pinned grant"), "{err}");

    // A backend in a driver domain (7) never accepts direct, even when allowed.
    const B: DomId = 7;
    w.guest(B);
    let store: Arc<dyn XenStore> = Arc::new(w.xs.connect(B).unwrap());
    let driver_domain = Daemon::new(
        w.hv.domain(B),
        store,
        DaemonConfig {
            allow_direct: vec![DomainSelector::Id(F)],
            ..Default::default()
        },
    )
    .unwrap()
    .spawn()
    .unwrap();
    attach(&*w.dom0, B, F, 3, &TestDevice::rng().without_grant_usage()).unwrap();
    let err = TestFrontend::connect(
        w.hv.domain(F),
        w.guest(F),
        B,
        3,
        options(TestStrategy::Direct),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not Dom0"), "{err}");
    assert_eq!(w.hv.stats(B).foreign_maps, 0);
    // ... but serves grants.
    reset_frontend(&w, F, 3);
    let mut fe = TestFrontend::connect(
        w.hv.domain(F),
        w.guest(F),
        B,
        3,
        FrontendOptions::new(TestStrategy::GrantPerRequest),
    )
    .unwrap();
    fe.rng_read(8).unwrap();
    fe.close().unwrap();
    driver_domain.stop().unwrap();
}

/// A platform whose event channels panic in `pending()` for one peer domain: a bug in the
/// backend, as far as the daemon can tell.
#[derive(Debug, Clone)]
struct PanickyPlatform {
    inner: LoopbackDomain,
    armed: Arc<AtomicU16>,
}

#[derive(Debug)]
struct PanickyEvents {
    inner: xenvirtio_xen::loopback::LoopbackEvents,
    armed: Arc<AtomicU16>,
    peer: Mutex<Option<DomId>>,
}

impl AsRawFd for PanickyEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl EventChannels for PanickyEvents {
    fn bind_unbound(&self, remote: DomId) -> Result<Port, XenError> {
        self.inner.bind_unbound(remote)
    }
    fn bind_interdomain(&self, remote: DomId, port: Port) -> Result<Port, XenError> {
        *self.peer.lock().unwrap() = Some(remote);
        self.inner.bind_interdomain(remote, port)
    }
    fn unbind(&self, port: Port) -> Result<(), XenError> {
        self.inner.unbind(port)
    }
    fn notify(&self, port: Port) -> Result<(), XenError> {
        self.inner.notify(port)
    }
    fn pending(&self) -> Result<Vec<Port>, XenError> {
        let ports = self.inner.pending()?;
        if *self.peer.lock().unwrap() == Some(self.armed.load(Ordering::SeqCst)) {
            panic!("injected fault");
        }
        Ok(ports)
    }
    fn unmask(&self, ports: &[Port]) -> Result<(), XenError> {
        self.inner.unmask(ports)
    }
    fn restrict(&self, dom: DomId) -> Result<(), XenError> {
        self.inner.restrict(dom)
    }
}

impl Platform for PanickyPlatform {
    type GrantAlloc = <LoopbackDomain as Platform>::GrantAlloc;
    type GrantMap = <LoopbackDomain as Platform>::GrantMap;
    type Events = PanickyEvents;
    type Foreign = <LoopbackDomain as Platform>::Foreign;
    type Pinned = <LoopbackDomain as Platform>::Pinned;
    fn domid(&self) -> DomId {
        self.inner.domid()
    }
    fn grant_allocator(&self) -> Result<Self::GrantAlloc, XenError> {
        self.inner.grant_allocator()
    }
    fn grant_mapper(&self) -> Result<Self::GrantMap, XenError> {
        self.inner.grant_mapper()
    }
    fn event_channels(&self) -> Result<Self::Events, XenError> {
        Ok(PanickyEvents {
            inner: self.inner.event_channels()?,
            armed: Arc::clone(&self.armed),
            peer: Mutex::new(None),
        })
    }
    fn foreign_mapper(&self) -> Result<Self::Foreign, XenError> {
        self.inner.foreign_mapper()
    }
    fn pinned_allocator(&self) -> Result<Self::Pinned, XenError> {
        self.inner.pinned_allocator()
    }
}

#[test]
fn a_panic_in_one_device_thread_is_that_device_s_error() {
    let mut w = World::new();
    w.stop_daemon();
    let armed = Arc::new(AtomicU16::new(u16::MAX));
    let store: Arc<dyn XenStore> = Arc::new(w.xs.connect(0).unwrap());
    let platform = PanickyPlatform {
        inner: w.hv.domain(0),
        armed: Arc::clone(&armed),
    };
    let daemon = Daemon::new(platform, store, DaemonConfig::default())
        .unwrap()
        .spawn()
        .unwrap();
    w.attach(F, 0, &TestDevice::rng());
    w.attach(G, 0, &TestDevice::rng());
    let mut victim = w.connect(F, 0, options(TestStrategy::GrantPerRequest));
    let mut bystander = w.connect(G, 0, options(TestStrategy::GrantPerRequest));
    victim.rng_read(8).unwrap();
    armed.store(F, Ordering::SeqCst);
    // The fault fires in `pending()`: a request that the device thread finds on its own while
    // still busy (the re-check after re-enabling notifications) is served without it, so allow
    // a few requests before the thread goes idle and takes the poisoned event.
    let failed_within = (1..=10).find(|_| {
        let failed = victim.rng_read(8).is_err();
        if !failed {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        failed
    });
    assert!(
        failed_within.is_some(),
        "the injected panic never reached the victim"
    );
    let error = expect_error(&victim, "panic");
    assert!(
        error.contains("internal error") && error.contains("injected fault"),
        "{error}"
    );
    assert_eq!(
        w.live_maps_of(F),
        0,
        "the unwinding dropped the victim's mappings"
    );
    assert_eq!(bystander.rng_read(8).unwrap().len(), 8);
    // The device recovers once the frontend starts over.
    armed.store(u16::MAX, Ordering::SeqCst);
    victim.close().unwrap();
    reset_frontend(&w, F, 0);
    let mut victim = w.connect(F, 0, options(TestStrategy::GrantPerRequest));
    victim.rng_read(8).unwrap();
    victim.close().unwrap();
    bystander.close().unwrap();
    daemon.stop().unwrap();
}

#[test]
fn a_console_driver_cannot_make_the_backend_hold_more_than_a_queue() {
    let w = World::new();
    w.attach(F, 0, &TestDevice::console());
    let mut fe = w.connect(F, 0, options(TestStrategy::GrantPersistent));
    fe.provoke(0, Hostile::RepeatHead).unwrap();
    let error = expect_error(&fe, "RepeatHead");
    assert!(
        error.contains("more receive buffers outstanding"),
        "{error}"
    );
    fe.close().unwrap();
}

/// PROTOCOL.md 2.2 and 10.5: before InitWait the backend rewrites `grant_usage` with the
/// effective value (and offers ACCESS_PLATFORM exactly when it is 1), keeping the toolstack's
/// value in `toolstack-grant-usage`, so that a restarted daemon with another `--allow-direct`
/// list recomputes it. Found on real Xen: the toolstack's 0 was published unchanged to every
/// frontend, so an untrusted Arm DomU's policy would have picked `direct` and been refused.
#[test]
fn the_effective_grant_usage_is_published_and_recomputed_after_a_restart() {
    let keys = |w: &World, devid: u32| {
        let bdir = xenbus::backend_dir(0, F, devid);
        let read = |k: &str| {
            w.dom0
                .read_string(TxId::NONE, &format!("{bdir}/{k}"))
                .unwrap()
        };
        let features =
            u64::from_str_radix(read("device-features").trim_start_matches("0x"), 16).unwrap();
        (
            read("grant_usage"),
            read("toolstack-grant-usage"),
            features & (1 << 33) != 0,
        )
    };
    let mut w = World::new();
    w.guest(F);
    // 0: untrusted, toolstack 0; 1: toolstack 1; 2: untrusted, pinned to direct.
    w.attach(F, 0, &TestDevice::rng().without_grant_usage());
    w.attach(F, 1, &TestDevice::rng());
    w.attach(
        F,
        2,
        &TestDevice::rng().without_grant_usage().with_dma("grant"),
    );
    for devid in 0..3 {
        w.wait_backend_state(F, devid, XenbusState::InitWait);
    }
    assert_eq!(keys(&w, 0), ("1".into(), "0".into(), true));
    assert_eq!(keys(&w, 1), ("1".into(), "1".into(), true));
    assert_eq!(keys(&w, 2), ("1".into(), "0".into(), true));

    // Restarted with the domain trusted: device 0 may now go direct, device 1 still not (the
    // toolstack asked for grants), device 2 neither (pinned to grant).
    w.stop_daemon();
    w.config.allow_direct = vec![DomainSelector::Name(format!("guest{F}"))];
    w.start_daemon();
    eventually("the restarted daemon republished device 0", || {
        w.backend_state(F, 0) == Some(XenbusState::InitWait) && keys(&w, 0).0 == "0"
    });
    for devid in 1..3 {
        w.wait_backend_state(F, devid, XenbusState::InitWait);
    }
    assert_eq!(keys(&w, 0), ("0".into(), "0".into(), false));
    assert_eq!(keys(&w, 1), ("1".into(), "1".into(), true));
    assert_eq!(keys(&w, 2), ("1".into(), "0".into(), true));
    let mut fe = w.connect(F, 0, options(TestStrategy::Direct));
    fe.rng_read(8).unwrap();
    fe.close().unwrap();

    // Restarted without the trust: back to 1.
    w.stop_daemon();
    w.config.allow_direct = Vec::new();
    w.start_daemon();
    eventually(
        "the restarted daemon republished device 0 with grant_usage=1",
        || w.backend_state(F, 0) == Some(XenbusState::InitWait) && keys(&w, 0).0 == "1",
    );
    assert_eq!(keys(&w, 0), ("1".into(), "0".into(), true));
}
