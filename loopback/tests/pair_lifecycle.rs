//! The lifecycle of PROTOCOL.md section 8 with both real ends in one process: detach while
//! connected, close and reconnect, a backend daemon restart under a connected frontend, and a
//! frontend domain destroyed in the middle of I/O.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use xenvirtio_backend::admin::{DetachRequest, Removal};
use xenvirtio_frontend::blk::BlkError;
use xenvirtio_xenstore::xenbus::XenbusState;

const F: u16 = 1;

#[test]
fn detach_while_connected_stops_the_frontend_and_leaves_nothing_mapped() {
    let w = World::new();
    let img = w.image("detach.img", 1 << 20);
    let fe = w.frontend(GUEST);
    for strategy in STRATEGIES {
        let devid = w.attach_blk(F, &img, None);
        let dev = w.connect_blk(&fe, devid, strategy);
        dev.write_at(&data(8192, 5), 0).unwrap();
        assert!(!w.pair.backend_holdings(F).is_nothing());

        let out = w.pair.detach(&DetachRequest::new(F, devid)).unwrap();
        assert!(
            matches!(out.removal, Removal::Closed { .. }),
            "{strategy:?}: {:?}",
            out.removal
        );
        // The frontend saw the backend leave Connected and fails new I/O with the reason.
        eventually("the frontend notices", || dev.stopped().is_some());
        let e = dev.write_at(&data(512, 1), 0).unwrap_err();
        assert!(matches!(e, BlkError::Stopped { .. }), "{strategy:?}: {e}");
        // Detach removed both directories only after the backend reached Closed, so nothing
        // of the guest is mapped or bound any more.
        eventually(
            "the backend holds nothing of the guest and forgot the device",
            || {
                let h = w.pair.backend_holdings(F);
                h.is_nothing() && h.devices == 0
            },
        );
        assert_eq!(w.backend_state(F, devid), None);
        assert_eq!(read_file_range(&img, 0, 8192), data(8192, 5));
        // The directories are gone, so the frontend cannot confirm Closed itself: close says
        // so, and still revokes every grant.
        let e = dev.close().unwrap_err();
        assert!(
            chain(&e).contains("disappeared") || chain(&e).contains("removed"),
            "{strategy:?}: {}",
            chain(&e)
        );
        let left = w.pair.domain_stats(F);
        assert_eq!(left.grants, 0, "{strategy:?}: {left:?}");
        assert_eq!(left.bound_ports, 0, "{strategy:?}: {left:?}");
        assert_eq!(left.pages_mapped_by_peers, 0, "{strategy:?}: {left:?}");
    }
}

#[test]
fn close_and_reconnect_with_another_strategy_each_time() {
    let w = World::new();
    let img = w.image("reconnect.img", 1 << 20);
    let fe = w.frontend(GUEST);
    let devid = w.attach_blk(F, &img, None);
    let order = [
        Strategy::GrantPerRequest,
        Strategy::Bounce,
        Strategy::Direct,
        Strategy::GrantPersistent,
        Strategy::GrantPerRequest,
    ];
    for (i, strategy) in order.into_iter().enumerate() {
        let dev = w.connect_blk(&fe, devid, strategy);
        assert_eq!(dev.negotiated().strategy, strategy.dma());
        // What the previous connection wrote is there.
        if i > 0 {
            let mut back = vec![0u8; 4096];
            dev.read_at(&mut back, (i as u64 - 1) * 4096).unwrap();
            assert_eq!(back, data(4096, i as u8 - 1), "{strategy:?}");
        }
        dev.write_at(&data(4096, i as u8), i as u64 * 4096).unwrap();
        dev.close().unwrap();
        assert_eq!(w.frontend_state(F, devid), Some(XenbusState::Closed));
        eventually("the backend is ready again", || {
            w.backend_state(F, devid) == Some(XenbusState::InitWait)
        });
        assert!(w.pair.backend_holdings(F).is_nothing(), "{strategy:?}");
        assert!(w.pair.domain_stats(F).is_idle(), "{strategy:?}");
    }
}

#[test]
fn a_backend_restart_under_a_connected_frontend_and_the_frontend_reconnects() {
    let mut w = World::new();
    let img = w.image("restart.img", 4 << 20);
    let fe = w.frontend(GUEST);
    let devid = w.attach_blk(F, &img, None);
    for strategy in STRATEGIES {
        let dev = w.connect_blk(&fe, devid, strategy);
        let written = AtomicU64::new(0);
        let running = AtomicBool::new(true);
        let outcome = std::thread::scope(|s| {
            let io = s.spawn(|| {
                // Writes until the device stops; every write that succeeded is on disk.
                let mut n = 0u64;
                loop {
                    let at = (n % 64) * 65536;
                    match dev.write_at(&data(65536, n as u8), at) {
                        Ok(()) => {
                            n += 1;
                            written.store(n, Ordering::SeqCst);
                        }
                        Err(e) => return e,
                    }
                    if !running.load(Ordering::SeqCst) && n > 1000 {
                        panic!("the device never stopped");
                    }
                }
            });
            eventually("I/O is running", || written.load(Ordering::SeqCst) > 4);
            w.pair.stop_daemon().unwrap();
            running.store(false, Ordering::SeqCst);
            io.join().unwrap()
        });
        assert!(
            matches!(outcome, BlkError::Stopped { .. }),
            "{strategy:?}: {outcome}"
        );
        // The daemon is gone and holds nothing; the frontend answered its Closing.
        assert!(w.pair.daemon().is_none());
        assert_eq!(
            w.pair.hypervisor().stats(0).grant_maps + w.pair.hypervisor().stats(0).foreign_maps,
            0
        );
        assert_eq!(w.frontend_state(F, devid), Some(XenbusState::Closing));
        // Every write the frontend saw complete is on disk.
        let n = written.load(Ordering::SeqCst);
        let image = std::fs::read(&img).unwrap();
        for k in n.saturating_sub(64)..n {
            let at = ((k % 64) * 65536) as usize;
            assert!(
                image[at..at + 65536] == data(65536, k as u8),
                "{strategy:?}: write {k} of {n} is not on disk"
            );
        }

        // A new daemon starts; the frontend closes its stopped device and connects again.
        w.pair.start_daemon().unwrap();
        dev.close().unwrap();
        let dev = w.connect_blk(&fe, devid, strategy);
        let mut back = vec![0u8; 65536];
        let last = n - 1;
        dev.read_at(&mut back, (last % 64) * 65536).unwrap();
        assert!(back == data(65536, last as u8), "{strategy:?}");
        dev.write_at(&data(4096, 0xee), 0).unwrap();
        dev.close().unwrap();
        assert_eq!(read_file_range(&img, 0, 4096), data(4096, 0xee));
        eventually("the backend holds nothing of the guest", || {
            w.pair.backend_holdings(F).is_nothing()
        });
    }
}

#[test]
fn a_guest_destroyed_mid_io_leaves_the_backend_holding_nothing_of_it() {
    let w = World::new();
    let img = w.image("doomed.img", 4 << 20);
    let other_img = w.image("survivor.img", 4 << 20);
    for strategy in STRATEGIES {
        // A fresh victim domain each time (a destroyed domid stays destroyed).
        let victim = 10 + strategy as u16;
        let devid = w.attach_blk(victim, &img, Some(2));
        let other_devid = w.attach_blk_again(OTHER, &other_img, None);
        let fe = w.frontend_as(GUEST, victim);
        let other_fe = w.frontend_as(GUEST, OTHER);
        let mut opts = strategy.blk();
        opts.connect.num_queues = Some(2);
        let dev = fe.connect_blk(devid, &opts).unwrap();
        let other = w.connect_blk(&other_fe, other_devid, Strategy::GrantPersistent);
        let survivor_writes = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let dev = &dev;
                s.spawn(move || {
                    let mut i = 0u64;
                    // Ends with an error once the domain is gone.
                    while dev
                        .write_at(&data(32768, i as u8), (t * 64 + i % 64) * 32768)
                        .is_ok()
                    {
                        i += 1;
                    }
                });
            }
            let other = &other;
            let survivor_writes = &survivor_writes;
            s.spawn(move || {
                for i in 0..200u64 {
                    other
                        .write_at(&data(16384, i as u8), (i % 128) * 16384)
                        .unwrap();
                    survivor_writes.fetch_add(1, Ordering::SeqCst);
                }
            });
            eventually("both guests do I/O", || {
                survivor_writes.load(Ordering::SeqCst) > 10
                    && w.pair
                        .device_stats(victim, devid)
                        .is_some_and(|s| s.requests > 10)
            });
            w.pair.destroy_domain(victim);
        });
        // Nothing of the dead domain stays mapped or bound, and the daemon forgot it.
        eventually("the backend drops everything of the dead domain", || {
            let h = w.pair.backend_holdings(victim);
            h.is_nothing() && h.devices == 0
        });
        let dead = w.pair.domain_stats(victim);
        assert!(dead.destroyed);
        assert_eq!(dead.pages_mapped_by_peers, 0, "{strategy:?}: {dead:?}");
        let live_of_dead = w
            .pair
            .hypervisor()
            .records()
            .into_iter()
            .filter(|r| r.owner == victim && r.live)
            .count();
        assert_eq!(live_of_dead, 0, "{strategy:?}");
        // The other guest's device kept working and still does.
        assert_eq!(survivor_writes.load(Ordering::SeqCst), 200);
        other.write_at(&data(4096, 0x77), 0).unwrap();
        let mut back = vec![0u8; 16384];
        other.read_at(&mut back, 16384).unwrap();
        assert!(back == data(16384, 129), "the last write of that block");
        assert_eq!(read_file_range(&other_img, 0, 4096), data(4096, 0x77));
        // The dead guest's frontend cannot close through a store that is gone; dropping it
        // must not hang or panic.
        let _ = dev.close();
        other.close().unwrap();
        eventually("the backend holds nothing of the other guest", || {
            w.pair.backend_holdings(OTHER).is_nothing()
        });
    }
}
