//! The frontend against a scripted backend over the loopback platform and the in-memory
//! store: the handshake, every DMA strategy, the per-buffer rule, teardown and the restart
//! rule.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use xenvirtio_frontend::blk::{BlkError, BlkOptions};
use xenvirtio_frontend::{ConnectError, ConnectOptions, Frontend};
use xenvirtio_virtio::dma::{DmaAddr, DmaStrategy};
use xenvirtio_xen::loopback::{LoopbackConfig, LoopbackXen};
use xenvirtio_xen::role::{Arch, GuestType};
use xenvirtio_xenstore::TxId;
use xenvirtio_xenstore::xenbus::{self, XenbusState};

fn options(dma: Option<DmaStrategy>) -> BlkOptions {
    let mut o = BlkOptions::default();
    o.connect.dma = dma;
    o.connect.timeout = Duration::from_secs(5);
    o
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed >> 1))
        .collect()
}

#[test]
fn grant_blk_round_trip_and_one_transaction() {
    let env = Env::new();
    let backend = Backend::start(&env, Script::blk(0));
    let rec = Recorder::new(Arc::clone(&env.guest));
    let fe = Frontend::new(env.guest_platform(), rec.clone(), pvh());
    let dev = fe.connect_blk(0, &options(None)).unwrap();
    assert_eq!(dev.negotiated().strategy, DmaStrategy::Grant);
    assert!(dev.negotiated().persistent);
    assert_eq!(dev.size(), 8192 * 512);

    // Every key of section 2.3 and state=3 were written in one committed transaction.
    let fdir = xenbus::frontend_dir(GUEST, 0);
    let ops = rec.ops.lock().unwrap().clone();
    let state3 = ops
        .iter()
        .position(|(_, tx, p)| p == &format!("{fdir}/state") && tx.is_some())
        .expect("state was written inside a transaction");
    let tx = ops[state3].1;
    for key in [
        "driver-features",
        "dma",
        "dma-reason",
        "num-queues",
        "queue-0/size",
        "queue-0/ring-ref",
        "queue-0/event-channel",
        "feature-persistent",
    ] {
        let path = format!("{fdir}/{key}");
        let writes: Vec<_> = ops
            .iter()
            .filter(|(op, _, p)| *op == "write" && p == &path)
            .collect();
        assert!(!writes.is_empty(), "{key} was not written");
        assert!(
            writes.iter().all(|(_, t, _)| *t == tx),
            "{key} written outside the transaction"
        );
    }
    assert!(rec.commits.lock().unwrap().contains(&(tx, true)));
    let seen = backend.seen.lock().unwrap().published.clone();
    assert_eq!(seen.get("state").map(String::as_str), Some("3"));
    assert_eq!(seen.get("dma").map(String::as_str), Some("grant"));
    assert!(seen.get("dma-reason").unwrap().contains("grants"));

    // Data.
    let data = pattern(300_000, 7);
    dev.write_at(&data, 4096 * 3 + 100).unwrap();
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 4096 * 3 + 100).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        &backend.disk.lock().unwrap()[4096 * 3 + 100..4096 * 3 + 100 + data.len()],
        &data[..]
    );
    assert_eq!(dev.get_id().unwrap(), b"scripted-disk");
    dev.flush().unwrap();
    dev.write_zeroes(4096 * 3 + 100, 1000, false).unwrap();
    dev.read_at(&mut back[..1000], 4096 * 3 + 100).unwrap();
    assert!(back[..1000].iter().all(|&b| b == 0));
    let stats = dev.stats();
    assert!(
        stats.events.sent > 0 && stats.events.received > 0,
        "{stats:?}"
    );
    dev.close().unwrap();
    assert_eq!(
        xenbus::read_state(&*env.guest, TxId::NONE, &format!("{fdir}/state")).unwrap(),
        XenbusState::Closed
    );
    assert_eq!(
        env.xen.stats(GUEST).grants,
        0,
        "grants revoked after Closed"
    );
    assert!(
        backend.seen.lock().unwrap().errors.is_empty(),
        "{:?}",
        backend.seen.lock().unwrap().errors
    );
}

#[test]
fn bounce_pool_directory_is_read_only_and_copies_are_counted() {
    let env = Env::new();
    let backend = Backend::start(&env, Script::blk(1));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let mut o = options(Some(DmaStrategy::Bounce));
    o.connect.dma_pages = 128;
    let dev = fe.connect_blk(1, &o).unwrap();
    assert_eq!(dev.negotiated().strategy, DmaStrategy::Bounce);
    let published = backend.seen.lock().unwrap().published.clone();
    assert_eq!(
        published.get("bounce/pages").map(String::as_str),
        Some("128")
    );
    assert!(!published.contains_key("feature-persistent"));
    let dir: Vec<u32> = published["bounce/dir-ref"]
        .split(' ')
        .map(|r| r.parse().unwrap())
        .collect();
    assert_eq!(dir.len(), 1);
    // The directory is granted to the backend read-only: mapping it writable is refused, and
    // nobody else may map it at all.
    use xenvirtio_xen::platform::{GrantMapper, Platform};
    use xenvirtio_xen::{Access, Refusal};
    let dom0 = env.xen.domain(BACKEND).grant_mapper().unwrap();
    let e = dom0.map(GUEST, &dir, Access::ReadWrite).unwrap_err();
    assert_eq!(e.refusal(), Some(Refusal::ReadOnlyGrant), "{e}");
    let dom7 = env.xen.domain(7).grant_mapper().unwrap();
    assert!(matches!(
        dom7.map(GUEST, &dir, Access::ReadOnly)
            .unwrap_err()
            .refusal(),
        Some(Refusal::NotGrantedTo { grantee: 0 })
    ));

    let before = dev.stats().dma.bytes_bounced;
    let data = pattern(64 * 1024, 3);
    dev.write_at(&data, 512 * 10).unwrap();
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 512 * 10).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        dev.stats().dma.bytes_bounced - before,
        2 * data.len() as u64
    );
    // Every address the backend saw was a pool offset.
    for a in &backend.seen.lock().unwrap().addresses {
        assert!(
            matches!(a, DmaAddr::Bounce { offset } if *offset < 128 * 4096),
            "{a:?}"
        );
    }
    dev.close().unwrap();
    assert_eq!(env.xen.stats(GUEST).grants, 0);
}

/// A blocking transfer larger than the device's whole DMA memory goes through in pieces.
/// Regression: `write_at` allocated the staging buffers of a window of up to 8 requests before
/// running any of them; with the default 256 pages (and requests of a quarter of it), a 1 MiB
/// write waited for buffers it held itself until the I/O timeout (found on real Xen, Dom0
/// bouncing).
#[test]
fn transfers_larger_than_the_dma_memory_do_not_wait_for_themselves() {
    for strategy in [DmaStrategy::Bounce, DmaStrategy::Grant] {
        let env = Env::new();
        let backend = Backend::start(&env, Script::blk(0));
        let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
        let mut o = options(Some(strategy));
        o.connect.dma_pages = 64;
        o.io_timeout = Some(Duration::from_secs(5));
        let dev = fe.connect_blk(0, &o).unwrap();
        let data = pattern(3 * 1024 * 1024 + 1000, 5);
        let started = std::time::Instant::now();
        dev.write_at(&data, 512 * 3 + 7).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 512 * 3 + 7).unwrap();
        assert!(back == data, "{strategy}: the data read back differs");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{strategy}: took {:?}",
            started.elapsed()
        );
        dev.close().unwrap();
        assert!(backend.seen.lock().unwrap().errors.is_empty());
    }
}

#[test]
fn caller_slices_are_bounced_through_the_grant_arena() {
    let env = Env::new();
    let backend = Backend::start(&env, Script::blk(0));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let dev = fe
        .connect_blk(0, &options(Some(DmaStrategy::Grant)))
        .unwrap();
    let grants_before = env.xen.stats(GUEST).grants;
    let data = pattern(40_960, 11);
    dev.write_at(&data, 0).unwrap();
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
    // No grant was allocated for the caller's heap memory: it was copied into the arena.
    assert_eq!(env.xen.stats(GUEST).grants, grants_before);
    assert_eq!(dev.stats().dma.bytes_bounced, 2 * data.len() as u64);
    // Every buffer the backend was given is a page of the arena or a ring: granted to it.
    for a in &backend.seen.lock().unwrap().addresses {
        let DmaAddr::Grant { gref, .. } = a else {
            panic!("{a:?} is not a grant address")
        };
        assert!(
            env.xen.grant_gfn(GUEST, *gref).is_some(),
            "ref {gref} is not a live grant"
        );
    }
    // A zero-copy buffer is not bounced.
    let buf = dev.alloc(4096).unwrap();
    buf.write(0, &[0xab; 4096]).unwrap();
    let id = {
        let mut q = dev.lock_queue(0);
        let id = q.submit_write(buf, 8).unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            done = q.wait(Some(Duration::from_secs(5))).unwrap();
        }
        assert_eq!(done[0].id, id);
        assert_eq!(*done[0].result.as_ref().unwrap(), 4096);
        assert!(done[0].buf.is_some());
        id
    };
    let _ = id;
    assert_eq!(dev.stats().dma.bytes_bounced, 2 * data.len() as u64);
    assert!(
        backend.disk.lock().unwrap()[8 * 512..8 * 512 + 4096]
            .iter()
            .all(|&b| b == 0xab)
    );
    dev.close().unwrap();
}

#[test]
fn direct_on_an_arm_domu_uses_frame_numbers() {
    let env = Env::new();
    let mut script = Script::blk(2);
    script.grant_usage = false;
    let backend = Backend::start(&env, script);
    let fe = Frontend::new(
        env.guest_platform(),
        Arc::clone(&env.guest),
        role(false, Arch::Aarch64, GuestType::Hvm),
    );
    let dev = fe.connect_blk(2, &options(None)).unwrap();
    assert_eq!(
        dev.negotiated().strategy,
        DmaStrategy::Direct,
        "{}",
        dev.negotiated().reason
    );
    let published = backend.seen.lock().unwrap().published.clone();
    assert!(published.contains_key("queue-0/ring-gfn"));
    assert!(!published.contains_key("queue-0/ring-ref"));
    let data = pattern(200_000, 5);
    dev.write_at(&data, 12345).unwrap();
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    assert_eq!(env.xen.stats(GUEST).grants, 0, "direct grants nothing");
    for a in &backend.seen.lock().unwrap().addresses {
        assert!(matches!(a, DmaAddr::Direct { .. }), "{a:?}");
    }
    dev.close().unwrap();
    assert_eq!(
        env.xen.stats(GUEST).pinned_pages,
        0,
        "unpinned after Closed"
    );
}

#[test]
fn direct_is_refused_where_it_is_invalid() {
    let env = Env::new();
    let _backend = Backend::start(&env, Script::blk(0));
    // x86 PV guest.
    let fe = Frontend::new(
        env.guest_platform(),
        Arc::clone(&env.guest),
        role(false, Arch::X86_64, GuestType::Pv),
    );
    let e = fe
        .connect_blk(0, &options(Some(DmaStrategy::Direct)))
        .unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("pseudo-physical"), "{msg}");
    let fdir = xenbus::frontend_dir(GUEST, 0);
    assert!(
        read_str(&*env.guest, &format!("{fdir}/error"))
            .unwrap()
            .contains("pseudo-physical")
    );
    assert_eq!(
        read_str(&*env.guest, &format!("{fdir}/state")).unwrap(),
        "6"
    );
    // The device offers ACCESS_PLATFORM (grant_usage=1), even on Arm.
    let fe = Frontend::new(
        env.guest_platform(),
        Arc::clone(&env.guest),
        role(false, Arch::Aarch64, GuestType::Hvm),
    );
    let e = fe
        .connect_blk(0, &options(Some(DmaStrategy::Direct)))
        .unwrap_err();
    let msg = format!("{}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("ACCESS_PLATFORM"), "{msg}");
    // And the same device then connects with grants after all (Closed -> Initialising).
    let dev = fe.connect_blk(0, &options(None)).unwrap();
    assert_eq!(dev.negotiated().strategy, DmaStrategy::Grant);
    assert!(
        read_str(&*env.guest, &format!("{fdir}/error")).is_none(),
        "the old error is cleared"
    );
    dev.close().unwrap();
}

#[test]
fn many_threads_and_queues_in_flight_at_once() {
    let env = Env::new();
    let backend = Backend::start(&env, Script::blk(0));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let mut o = options(None);
    o.connect.num_queues = Some(3);
    o.depth = 8;
    let dev = fe.connect_blk(0, &o).unwrap();
    assert_eq!(dev.num_queues(), 3);
    std::thread::scope(|s| {
        for t in 0..6u8 {
            let dev = &dev;
            s.spawn(move || {
                for i in 0..20u64 {
                    let data = pattern(8192 + 512 * usize::from(t), t + 1);
                    let at = (u64::from(t) * 64 + i * 3) * 4096;
                    dev.write_at(&data, at).unwrap();
                    let mut back = vec![0u8; data.len()];
                    dev.read_at(&mut back, at).unwrap();
                    assert_eq!(back, data, "thread {t} round {i}");
                }
            });
        }
    });
    assert!(backend.seen.lock().unwrap().errors.is_empty());
    dev.close().unwrap();
}

#[test]
fn zero_copy_requests_complete_out_of_band() {
    let env = Env::new();
    let _backend = Backend::start(&env, Script::blk(0));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let dev = fe.connect_blk(0, &options(None)).unwrap();
    let mut q = dev.lock_queue(0);
    let mut ids = Vec::new();
    for i in 0..8u64 {
        let buf = q.alloc(16 * 1024).unwrap();
        buf.write(0, &vec![i as u8; 16 * 1024]).unwrap();
        ids.push(q.submit_write(buf, i * 32).unwrap());
    }
    let mut done = Vec::new();
    while done.len() < ids.len() {
        done.extend(q.wait(Some(Duration::from_secs(5))).unwrap());
    }
    let mut got: Vec<_> = done.iter().map(|c| c.id).collect();
    got.sort();
    assert_eq!(got, ids);
    // Read back through zero-copy reads.
    for i in 0..8u64 {
        let buf = q.alloc(16 * 1024).unwrap();
        q.submit_read(buf, i * 32).unwrap();
    }
    let mut n = 0;
    while n < 8 {
        for c in q.wait(Some(Duration::from_secs(5))).unwrap() {
            let buf = c.buf.unwrap();
            let mut v = vec![0u8; buf.len()];
            buf.read(0, &mut v).unwrap();
            let want = v[0];
            assert!(v.iter().all(|&b| b == want));
            n += 1;
        }
    }
    // Checks before submission give the buffer back.
    let buf = q.alloc(1000).unwrap();
    let r = q.submit_write(buf, 0).unwrap_err();
    assert!(matches!(r.error, BlkError::Unaligned { len: 1000, .. }));
    assert!(r.buf.is_some());
    let buf = q.alloc(4096).unwrap();
    let r = q.submit_read(buf, 8192).unwrap_err();
    assert!(
        matches!(r.error, BlkError::OutOfRange { .. }),
        "{}",
        r.error
    );
    drop(q);
    dev.close().unwrap();
}

#[test]
fn a_backend_that_stalls_mid_handshake_times_out_with_a_clear_error() {
    let env = Env::new();
    let mut script = Script::blk(0);
    script.stall_at_init_wait = true;
    let _backend = Backend::start(&env, script);
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let mut o = options(None);
    o.connect.timeout = Duration::from_millis(400);
    let start = std::time::Instant::now();
    let e = fe.connect_blk(0, &o).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            ConnectError::BackendTimeout {
                waiting_for: "Connected",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("did not reach Connected") && msg.contains("xenvirtio-backend"),
        "{msg}"
    );
    assert_eq!(env.xen.stats(GUEST).bound_ports, 0, "event channels closed");
}

#[test]
fn a_backend_that_never_publishes_and_a_vanished_backend_are_errors() {
    let env = Env::new();
    env.attach(3, xenvirtio_virtio::ids::DeviceKind::Block, true, "auto");
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let mut o = options(None);
    o.connect.timeout = Duration::from_millis(300);
    let e = fe.connect_blk(3, &o).unwrap_err();
    assert!(
        matches!(
            e,
            ConnectError::BackendTimeout {
                waiting_for: "InitWait",
                ..
            }
        ),
        "{e}"
    );
    // The backend directory disappears while the frontend waits.
    let dom0 = Arc::clone(&env.dom0);
    let be = xenbus::backend_dir(BACKEND, GUEST, 3);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        dom0.rm(TxId::NONE, &be).unwrap();
    });
    o.connect.timeout = Duration::from_secs(5);
    let e = fe.connect_blk(3, &o).unwrap_err();
    t.join().unwrap();
    assert!(matches!(e, ConnectError::BackendGone { .. }), "{e}");
    // No such device.
    let e = fe.connect_blk(42, &o).unwrap_err();
    assert!(e.to_string().contains("no virtio device 42"), "{e}");
}

#[test]
fn a_leftover_connected_state_is_closed_first() {
    let env = Env::new();
    let mut script = Script::blk(0);
    script.initial_state = Some(XenbusState::Connected);
    let fdir = xenbus::frontend_dir(GUEST, 0);
    let backend = Backend::start(&env, script);
    // An earlier instance left Sf = 4 and stale keys.
    env.guest
        .write(TxId::NONE, &format!("{fdir}/queue-7/ring-ref"), b"999")
        .unwrap();
    env.guest
        .write(TxId::NONE, &format!("{fdir}/state"), b"4")
        .unwrap();
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let dev = fe.connect_blk(0, &options(None)).unwrap();
    // The backend (which samples states) saw Closing before the new Initialised.
    let states = backend.seen.lock().unwrap().frontend_states.clone();
    let closing = states.iter().position(|s| *s == XenbusState::Closing);
    let initialised = states.iter().rposition(|s| *s == XenbusState::Initialised);
    assert!(closing.is_some() && closing < initialised, "{states:?}");
    dev.write_at(&[9u8; 512], 0).unwrap();
    assert!(
        read_str(&*env.guest, &format!("{fdir}/queue-7/ring-ref")).is_none(),
        "stale keys removed"
    );
    dev.close().unwrap();
}

#[test]
fn a_backend_that_goes_closing_fails_requests_and_tears_down() {
    let env = Env::new();
    let backend = Backend::start(&env, Script::blk(0));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let dev = fe.connect_blk(0, &options(None)).unwrap();
    dev.write_at(&[1u8; 4096], 0).unwrap();
    // The backend gives up on the device with an error.
    env.dom0
        .write(
            TxId::NONE,
            &format!("{}/error", backend.be),
            b"image went away",
        )
        .unwrap();
    env.dom0
        .write(TxId::NONE, &format!("{}/state", backend.be), b"5")
        .unwrap();
    wait_until("the device to stop", Duration::from_secs(5), || {
        dev.stopped().is_some()
    });
    let e = dev.write_at(&[1u8; 4096], 0).unwrap_err();
    assert!(matches!(e, BlkError::Stopped { .. }), "{e}");
    assert!(e.to_string().contains("image went away"), "{e}");
    dev.close().unwrap();
    let fdir = xenbus::frontend_dir(GUEST, 0);
    assert_eq!(
        read_str(&*env.guest, &format!("{fdir}/state")).unwrap(),
        "6"
    );
    assert_eq!(env.xen.stats(GUEST).grants, 0);
}

#[test]
fn gntalloc_exhaustion_names_the_module_parameter() {
    let xen = LoopbackXen::with_config(LoopbackConfig {
        max_grants: 64,
        ..LoopbackConfig::default()
    });
    let env = Env::with_xen(xen);
    let _backend = Backend::start(&env, Script::blk(0));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let mut o = options(None);
    o.connect.dma_pages = 256;
    let e = fe.connect_blk(0, &o).unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        msg.contains("xen-gntalloc") && msg.contains("limit"),
        "{msg}"
    );
}

#[test]
fn rng_reads_what_the_backend_wrote() {
    let env = Env::new();
    let _backend = Backend::start(&env, Script::rng(4));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let mut rng = fe.connect_rng(4, &ConnectOptions::default()).unwrap();
    let mut buf = vec![0u8; 20000];
    assert_eq!(
        rng.read(&mut buf, Some(Duration::from_secs(5))).unwrap(),
        20000
    );
    // The scripted device writes i*31+7 per request of at most 16 KiB.
    assert_eq!(buf[1], 38);
    assert_eq!(buf[16384 + 1], 38);
    rng.close().unwrap();
    // A blk driver refuses an rng device.
    let e = fe.connect_blk(4, &options(None)).unwrap_err();
    assert!(matches!(e, ConnectError::WrongKind { .. }), "{e}");
}

#[test]
fn console_carries_bytes_both_ways() {
    let env = Env::new();
    let backend = Backend::start(&env, Script::console(6));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let console = fe.connect_console(6, &ConnectOptions::default()).unwrap();
    console.write(b"hello, port 0").unwrap();
    assert_eq!(backend.seen.lock().unwrap().console_in, b"hello, port 0");
    let big = pattern(10_000, 13);
    console.write(&big).unwrap();
    assert_eq!(backend.seen.lock().unwrap().console_in.len(), 13 + 10_000);
    backend
        .console_out
        .lock()
        .unwrap()
        .extend_from_slice(b"login: ");
    let mut got = Vec::new();
    let mut buf = [0u8; 3];
    while got.len() < 7 {
        let n = console
            .rx()
            .lock()
            .unwrap()
            .read(&mut buf, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(n > 0, "timed out");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"login: ");
    console.close().unwrap();
    assert_eq!(env.xen.stats(GUEST).grants, 0);
}

#[test]
fn a_blk_device_is_exported_over_nbd() {
    use xenvirtio_frontend::nbd::{BlockExport, NbdClient, NbdServer, NbdServerConfig};
    use xenvirtio_frontend::pattern;
    let env = Env::new();
    let backend = Backend::start(&env, Script::blk(0));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let dev = Arc::new(fe.connect_blk(0, &options(None)).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let export: Arc<dyn BlockExport> = Arc::clone(&dev) as Arc<dyn BlockExport>;
    let server = NbdServer::start(export, NbdServerConfig::new("disk").unix(&sock)).unwrap();
    let mut client = NbdClient::connect_unix(&sock, "disk").unwrap();
    assert_eq!(client.size(), 8192 * 512);
    let mut data = vec![0u8; 100_352];
    pattern::fill(77, 4096, &mut data);
    client.write_at(&data, 4096).unwrap();
    client.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    client.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        &backend.disk.lock().unwrap()[4096..4096 + data.len()],
        &data[..]
    );
    drop(client);
    server.shutdown();
    Arc::try_unwrap(dev).unwrap().close().unwrap();
}

/// `SupervisedBlk` (what `serve` exports): when the backend leaves Connected (here it goes to
/// Closing as a restarted backend does, PROTOCOL.md 8.5), the connection is closed by the
/// rules and made again, and a writer that keeps going sees no error.
#[test]
fn a_supervised_device_reconnects_and_callers_do_not_notice() {
    use xenvirtio_frontend::nbd::BlockExport;
    use xenvirtio_frontend::supervisor::SupervisedBlk;
    let env = Env::new();
    let backend = Backend::start(&env, Script::blk(0));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let dev =
        Arc::new(SupervisedBlk::connect(fe, 0, options(None), Duration::from_secs(10)).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let dev = Arc::clone(&dev);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut round = 0u8;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                round = round.wrapping_add(1);
                let data = pattern(64 * 1024, round | 1);
                dev.write_at(&data, 8192).unwrap();
                let mut back = vec![0u8; data.len()];
                dev.read_at(&mut back, 8192).unwrap();
                assert!(back == data, "round {round}: read back something else");
            }
            round
        })
    };
    for restart in 1..=2 {
        std::thread::sleep(Duration::from_millis(200));
        env.dom0
            .write(TxId::NONE, &format!("{}/state", backend.be), b"5")
            .unwrap();
        wait_until(
            "the supervisor to reconnect",
            Duration::from_secs(10),
            || dev.reconnects() == restart,
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = writer.join().expect("the writer saw no error");
    assert!(rounds > 2, "{rounds}");
    assert_eq!(backend.seen.lock().unwrap().connections, 3);
    assert!(backend.seen.lock().unwrap().errors.is_empty());
    let dev = Arc::try_unwrap(dev).unwrap();
    dev.close().unwrap();
    let fdir = xenbus::frontend_dir(GUEST, 0);
    assert_eq!(
        read_str(&*env.guest, &format!("{fdir}/state")).unwrap(),
        "6"
    );
    assert_eq!(env.xen.stats(GUEST).grants, 0, "every grant revoked");
}

/// A device detached for good (both of its xenstore directories removed, as
/// `xenvirtio-backend detach` leaves it) and not attached again within the detach grace is
/// given up: `detached()` says why, and a request fails at once instead of waiting out the
/// retry window, so that a kernel device on it can be taken away.
#[test]
fn a_supervised_device_detached_for_good_is_given_up() {
    use xenvirtio_frontend::nbd::BlockExport;
    use xenvirtio_frontend::supervisor::{SupervisedBlk, Waits};
    let env = Env::new();
    let backend = Backend::start(&env, Script::blk(0));
    let be = backend.be.clone();
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let waits = Waits {
        retry: Duration::from_secs(60),
        detach_grace: Duration::from_millis(500),
    };
    let dev = SupervisedBlk::connect_with(fe, 0, options(None), waits).unwrap();
    let data = pattern(4096, 7);
    dev.write_at(&data, 0).unwrap();
    assert_eq!(dev.detached(), None);
    drop(backend);
    env.dom0.rm(TxId::NONE, &be).unwrap();
    env.dom0
        .rm(TxId::NONE, &xenbus::frontend_dir(GUEST, 0))
        .unwrap();
    wait_until("the device to be given up", Duration::from_secs(20), || {
        dev.detached().is_some()
    });
    let why = dev.detached().unwrap();
    assert!(why.contains("blk device 0 was detached"), "{why}");
    let start = std::time::Instant::now();
    let mut back = vec![0u8; 4096];
    let err = dev.read_at(&mut back, 0).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the read waited {:?} for a device that is gone",
        start.elapsed()
    );
    assert_eq!(err.raw_os_error(), Some(libc::ESHUTDOWN), "{err}");
    assert_eq!(dev.reconnects(), 0);
    dev.close().unwrap();
}
