//! The handshake against Debian's real C xenstored (tests/xenstored-host), with the test
//! frontend connected as guest domain 5 through a ring, so every permission check is the
//! daemon's own. Memory and event channels are the loopback platform's.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use xenvirtio_backend::daemon::{Daemon, DaemonConfig};
use xenvirtio_backend::test_utils::{
    FrontendOptions, TestDevice, TestFrontend, TestStrategy, attach, remove, request_removal,
};
use xenvirtio_tests::xenstored::Xenstored;
use xenvirtio_xen::loopback::LoopbackXen;
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{Perm, TxId, XenStore};

const F: u16 = 5;

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn handshake_data_and_teardown_with_real_permissions() {
    let xsd = Xenstored::start();
    xsd.add_guest(F);
    let dom0: Arc<dyn XenStore> = Arc::new(xsd.client());
    let hv = LoopbackXen::new();
    let daemon = Daemon::new(
        hv.domain(0),
        Arc::new(xsd.client()),
        DaemonConfig::default(),
    )
    .unwrap()
    .spawn()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("real.img");
    std::fs::write(&image, vec![0x5au8; 64 * 512]).unwrap();

    // The toolstack's part, as dom0: both directories, perms n0 r5 / n5 r0.
    attach(&*dom0, 0, F, 0, &TestDevice::blk(&image)).unwrap();
    let bdir = xenbus::backend_dir(0, F, 0);
    let fdir = xenbus::frontend_dir(F, 0);
    assert_eq!(
        dom0.get_perms(TxId::NONE, &bdir).unwrap(),
        vec![Perm::owner(0), Perm::read(F)]
    );
    assert_eq!(
        dom0.get_perms(TxId::NONE, &fdir).unwrap(),
        vec![Perm::owner(F), Perm::read(0)]
    );

    let (_bridge, guest) = xsd.guest_client(F);
    let guest: Arc<dyn XenStore> = Arc::new(guest);
    for strategy in [TestStrategy::GrantPerRequest, TestStrategy::Bounce] {
        let mut fe = TestFrontend::connect(
            hv.domain(F),
            Arc::clone(&guest),
            0,
            0,
            FrontendOptions::new(strategy),
        )
        .unwrap_or_else(|e| panic!("{strategy:?}: {e:?}\n{}", xsd.log()));
        // The keys the backend wrote are the guest's to read, not to write.
        assert!(
            guest
                .read_string(TxId::NONE, &format!("{bdir}/device-features"))
                .is_ok()
        );
        let denied = guest
            .write_str(TxId::NONE, &format!("{bdir}/state"), "4")
            .unwrap_err();
        assert!(denied.is_eacces(), "{denied}");
        assert_eq!(fe.blk_read(0, 0, 4096).unwrap(), vec![0x5a; 4096]);
        fe.blk_write(0, 8, &[7u8; 1024]).unwrap();
        assert_eq!(
            &std::fs::read(&image).unwrap()[8 * 512..9 * 512],
            &[7u8; 512]
        );
        fe.close().unwrap();
        xenbus::wait_for_state(
            &*dom0,
            &xenbus::state_path(&bdir),
            |s| s == XenbusState::InitWait,
            Duration::from_secs(10),
        )
        .unwrap();
    }

    // Detach: online = 0 and Closing; the frontend follows; the backend lets go.
    let fe = TestFrontend::connect(
        hv.domain(F),
        Arc::clone(&guest),
        0,
        0,
        FrontendOptions::new(TestStrategy::GrantPersistent),
    )
    .unwrap();
    request_removal(&*dom0, 0, F, 0).unwrap();
    fe.close().unwrap();
    eventually("the detached device is forgotten", || {
        daemon.handle().device(F, 0).is_none()
    });
    remove(&*dom0, 0, F, 0).unwrap();

    // Domain death: xenstored releases the domain and fires @releaseDomain.
    attach(&*dom0, 0, F, 1, &TestDevice::rng()).unwrap();
    let mut fe = TestFrontend::connect(
        hv.domain(F),
        Arc::clone(&guest),
        0,
        1,
        FrontendOptions::new(TestStrategy::GrantPersistent),
    )
    .unwrap();
    assert_eq!(fe.rng_read(16).unwrap().len(), 16);
    hv.destroy(F);
    xsd.kill_domain(F);
    eventually("the dead domain's device is forgotten", || {
        daemon.handle().device(F, 1).is_none()
    });
    assert!(
        hv.records().iter().all(|r| !(r.owner == F && r.live)),
        "nothing of the dead domain stays mapped"
    );
    drop(fe);
    daemon.stop().unwrap();
}

/// Issue 13, finding 1, against the real daemon: a guest that rewrites its own `state` in a
/// loop fires Dom0's watch on it once per write (xenstored applies no quota to Dom0's watch
/// events), but Dom0's queue holds at most one pending event for the token however many
/// arrive, and the watcher still sees the last value.
#[test]
fn hostile_watch_flood_from_a_guest_through_real_xenstored() {
    const WRITES: usize = 5_000;
    let xsd = Xenstored::start();
    xsd.add_guest(F);
    let dom0 = xsd.client();
    let (_bridge, guest) = xsd.guest_client(F);
    let fdir = xenbus::frontend_dir(F, 0);
    dom0.mkdir(TxId::NONE, &fdir).unwrap();
    dom0.set_perms(TxId::NONE, &fdir, &[Perm::owner(F), Perm::read(0)])
        .unwrap();
    let state = format!("{fdir}/state");
    guest.write_str(TxId::NONE, &state, "1").unwrap();
    let events = dom0.watch_events_for("flood").unwrap();
    dom0.watch(&state, "flood").unwrap();
    let start = Instant::now();
    for i in 0..WRITES {
        let value = if i + 1 == WRITES { "5" } else { "4" };
        guest.write_str(TxId::NONE, &state, value).unwrap();
    }
    let took = start.elapsed();
    assert_eq!(dom0.read_string(TxId::NONE, &state).unwrap(), "5");
    // On main, 4,821 of the 5,000 events were queued by then; let the rest arrive too.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        events.len(),
        1,
        "{WRITES} guest writes in {took:?} while Dom0 did not drain: one pending event"
    );
    assert_eq!(events.try_next().unwrap().unwrap().path, state);
    assert_eq!(events.try_next().unwrap(), None);
}
