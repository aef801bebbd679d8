//! The xenstore client against Debian's real C xenstored (4.17), one daemon per test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use xenvirtio_tests::xenstored::Xenstored;
use xenvirtio_xenstore::wire::{self, MsgType};
use xenvirtio_xenstore::xenbus::{self, XenbusState};
use xenvirtio_xenstore::{
    Errno, Perm, Transaction, TxId, WatchEvent, XenStore, XsError, transaction,
};

const N: TxId = TxId::NONE;
const WAIT: Duration = Duration::from_secs(5);

fn errno<T: std::fmt::Debug>(r: Result<T, XsError>) -> Errno {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e
            .errno()
            .cloned()
            .unwrap_or_else(|| panic!("expected a daemon errno, got: {e}")),
    }
}

fn next_event(store: &dyn XenStore) -> WatchEvent {
    store
        .watch_events()
        .next_timeout(WAIT)
        .unwrap()
        .expect("a watch event within 5 s")
}

#[test]
fn read_write_mkdir_rm_directory_and_perms() {
    let xsd = Xenstored::start();
    let c = xsd.client();
    assert_eq!(c.directory(N, "/").unwrap(), vec!["tool"]);
    c.write(N, "/t/a/b", b"\x00\x01\xffnot utf-8").unwrap();
    assert_eq!(c.read(N, "/t/a/b").unwrap(), b"\x00\x01\xffnot utf-8");
    assert_eq!(c.read(N, "/t/a").unwrap(), b"");
    c.mkdir(N, "/t/m").unwrap();
    c.mkdir(N, "/t/m").unwrap();
    c.write(N, "/t/e", b"").unwrap();
    assert_eq!(c.directory(N, "/t").unwrap(), vec!["a", "m", "e"]);
    assert!(c.read(N, "/t/nope").unwrap_err().is_enoent());
    assert_eq!(c.read_optional(N, "/t/nope").unwrap(), None);
    c.rm(N, "/t/a").unwrap();
    assert!(!c.exists(N, "/t/a/b").unwrap());
    c.rm(N, "/t/absent").unwrap();
    assert_eq!(errno(c.rm(N, "/absent/child")), Errno::ENOENT);
    assert_eq!(errno(c.rm(N, "/")), Errno::EINVAL);
    assert_eq!(errno(c.write(N, "/bad name", b"")), Errno::EINVAL);
    c.write(N, "relative", b"r").unwrap();
    assert_eq!(c.read(N, "/local/domain/0/relative").unwrap(), b"r");
    assert_eq!(c.get_domain_path(7).unwrap(), "/local/domain/7");

    assert_eq!(c.get_perms(N, "/t").unwrap(), vec![Perm::owner(0)]);
    c.set_perms(N, "/t/m", &[Perm::owner(0), Perm::read(0)])
        .unwrap();
    assert_eq!(
        c.get_perms(N, "/t/m").unwrap(),
        vec![Perm::owner(0), Perm::read(0)]
    );
    // Owners must exist; other entries naming absent domains are kept (and ignored).
    assert_eq!(
        errno(c.set_perms(N, "/t/m", &[Perm::owner(42)])),
        Errno::ENOENT
    );
    c.set_perms(N, "/t/m", &[Perm::both(0), Perm::read(42)])
        .unwrap();
    assert_eq!(
        c.get_perms(N, "/t/m").unwrap(),
        vec![Perm::both(0), Perm::read(42)]
    );

    // Limits are checked before sending; the connection stays usable.
    let long = format!("/{}", "p".repeat(wire::ABS_PATH_MAX));
    assert!(matches!(c.read(N, &long), Err(XsError::PathTooLong { .. })));
    assert!(matches!(
        c.write(N, "/t/big", &[0u8; 4096]),
        Err(XsError::ValueTooLong { .. })
    ));
    let max_value = vec![b'v'; wire::PAYLOAD_MAX - "/t/big".len() - 1];
    c.write(N, "/t/big", &max_value).unwrap();
    assert_eq!(c.read(N, "/t/big").unwrap(), max_value);
}

#[test]
fn a_listing_over_4_kib_goes_through_directory_part() {
    let xsd = Xenstored::start();
    let c = xsd.client();
    let names: Vec<String> = (0..300)
        .map(|i| format!("child-with-a-longish-name-{i:04}"))
        .collect();
    let total: usize = names.iter().map(|n| n.len() + 1).sum();
    assert!(total > 2 * wire::PAYLOAD_MAX, "{total} bytes of names");
    let tx = c.transaction_start().unwrap();
    for n in &names {
        c.mkdir(tx, &format!("/big/{n}")).unwrap();
    }
    c.transaction_end(tx, true).unwrap();
    // The plain request is refused by the daemon...
    let raw = c.request(MsgType::Directory, N, wire::join_strings(&["/big"]));
    assert_eq!(errno(raw), Errno::E2BIG);
    // ...and directory() reassembles the parts, in order.
    assert_eq!(c.directory(N, "/big").unwrap(), names);
    let tx = c.transaction_start().unwrap();
    assert_eq!(c.directory(tx, "/big").unwrap(), names);
    c.transaction_end(tx, false).unwrap();
}

#[test]
fn a_watch_fires_on_a_write_by_debians_xenstore_write() {
    let xsd = Xenstored::start();
    let c = xsd.client();
    let mut events = c.watch_events();
    let mut poll = Poll::new().unwrap();
    poll.registry()
        .register(&mut events, Token(3), Interest::READABLE)
        .unwrap();

    c.watch("/vm/dev", "my-token").unwrap();
    assert_eq!(
        next_event(&c),
        WatchEvent {
            path: "/vm/dev".into(),
            token: "my-token".into()
        }
    );

    let out = xsd
        .tool("xenstore-write")
        .args(["/vm/dev/state", "4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xenstore-write failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut ready = Events::with_capacity(8);
    poll.poll(&mut ready, Some(WAIT)).unwrap();
    assert!(
        ready
            .iter()
            .any(|e| e.token() == Token(3) && e.is_readable()),
        "the queue woke our own Poll"
    );
    let ev = events.try_next().unwrap().expect("an event once readable");
    assert_eq!(
        ev,
        WatchEvent {
            path: "/vm/dev/state".into(),
            token: "my-token".into()
        }
    );
    assert_eq!(events.try_next().unwrap(), None);
    assert_eq!(c.read(N, "/vm/dev/state").unwrap(), b"4");

    c.unwatch("/vm/dev", "my-token").unwrap();
    let out = xsd
        .tool("xenstore-write")
        .args(["/vm/dev/state", "5"])
        .output()
        .unwrap();
    assert!(out.status.success());
    c.read(N, "/vm/dev/state").unwrap();
    assert_eq!(
        events.next_timeout(Duration::from_millis(200)).unwrap(),
        None,
        "no event after unwatch"
    );
}

#[test]
fn a_transaction_conflict_returns_eagain_and_the_retry_helper_then_succeeds() {
    let xsd = Xenstored::start();
    let a = xsd.client();
    let b = xsd.client();
    a.write(N, "/counter", b"0").unwrap();

    let tx = a.transaction_start().unwrap();
    assert_eq!(a.read(tx, "/counter").unwrap(), b"0");
    b.write(N, "/counter", b"100").unwrap();
    a.write(tx, "/counter", b"1").unwrap();
    assert_eq!(errno(a.transaction_end(tx, true)), Errno::EAGAIN);
    assert_eq!(a.read(N, "/counter").unwrap(), b"100");

    let mut attempts = 0;
    let value = transaction(&a, 10, |tx| {
        attempts += 1;
        let n: u64 = String::from_utf8(a.read(tx, "/counter")?)
            .unwrap()
            .parse()
            .unwrap();
        if attempts < 3 {
            b.write(N, "/counter", (n + 100).to_string().as_bytes())?;
        }
        a.write(tx, "/counter", (n + 1).to_string().as_bytes())?;
        Ok(n + 1)
    })
    .unwrap();
    assert_eq!(attempts, 3, "two conflicts, then a clean commit");
    assert_eq!(value, 301);
    assert_eq!(a.read(N, "/counter").unwrap(), b"301");

    let e = transaction(&a, 3, |tx| {
        a.read(tx, "/counter")?;
        b.write(N, "/counter", b"x")?;
        Ok(())
    })
    .unwrap_err();
    assert!(
        matches!(e, XsError::TransactionRetriesExhausted { attempts: 3 }),
        "{e}"
    );

    // A dropped guard aborts.
    {
        let tx = Transaction::start(&a).unwrap();
        a.write(tx.id(), "/dropped", b"1").unwrap();
    }
    assert!(!a.exists(N, "/dropped").unwrap());
    assert_eq!(errno(a.read(TxId(12345), "/counter")), Errno::ENOENT);
}

#[test]
fn a_guest_is_confined_by_permissions_and_quotas() {
    let xsd = Xenstored::start();
    xsd.add_guest(5);
    xsd.add_guest(7);
    let dom0 = xsd.client();
    let (_bridge5, g5) = xsd.guest_client(5);
    dom0.write(N, "/local/domain/0/secret", b"s3cr3t").unwrap();
    dom0.write(N, "/local/domain/7/backend/virtio/5/0/state", b"1")
        .unwrap();
    dom0.set_perms(
        N,
        "/local/domain/7/backend/virtio/5/0",
        &[Perm::owner(7), Perm::read(5)],
    )
    .unwrap();

    g5.write(N, "/local/domain/5/device/virtio/0/state", b"1")
        .unwrap();
    assert_eq!(g5.read(N, "device/virtio/0/state").unwrap(), b"1");
    assert_eq!(
        g5.get_perms(N, "device/virtio/0").unwrap(),
        vec![Perm::owner(5)]
    );
    assert_eq!(errno(g5.write(N, "/foo/x", b"y")), Errno::EACCES);
    assert_eq!(errno(g5.write(N, "/local/domain/7/x", b"y")), Errno::EACCES);
    assert_eq!(errno(g5.read(N, "/local/domain/0/secret")), Errno::EACCES);
    assert_eq!(errno(g5.read(N, "/local/domain/0/absent")), Errno::EACCES);
    assert_eq!(errno(g5.read(N, "/local/domain/5/absent")), Errno::ENOENT);
    // r5 grants reads, not writes.
    assert_eq!(
        g5.read(N, "/local/domain/7/backend/virtio/5/0").unwrap(),
        b""
    );
    assert_eq!(
        g5.directory(N, "/local/domain/7/backend/virtio/5/0")
            .unwrap(),
        vec!["state"]
    );
    assert_eq!(
        errno(g5.write(N, "/local/domain/7/backend/virtio/5/0/state", b"4")),
        Errno::EACCES
    );
    // Privileged operations are refused.
    assert_eq!(errno(g5.is_domain_introduced(5)), Errno::EACCES);
    assert_eq!(
        errno(g5.set_perms(N, "device", &[Perm::owner(7)])),
        Errno::EPERM
    );
    // Guest values: a one-permission node holds at most 2015 bytes (record < 2048).
    g5.write(N, "small", &[b'x'; 2015]).unwrap();
    assert_eq!(errno(g5.write(N, "small", &[b'x'; 2016])), Errno::ENOSPC);
    assert_eq!(errno(g5.write(N, "big", &[b'x'; 2049])), Errno::ENOSPC);
    dom0.write(N, "/local/domain/5/big", &[b'x'; 3000]).unwrap();

    // Watches and transactions work from the guest too.
    g5.watch("device", "g").unwrap();
    assert_eq!(
        next_event(&g5),
        WatchEvent {
            path: "device".into(),
            token: "g".into()
        }
    );
    dom0.write(N, "/local/domain/5/device/virtio/0/state", b"3")
        .unwrap();
    assert_eq!(
        next_event(&g5),
        WatchEvent {
            path: "device/virtio/0/state".into(),
            token: "g".into()
        }
    );
    transaction(&g5, 5, |tx| g5.write(tx, "device/virtio/0/ring-ref", b"8")).unwrap();
    assert_eq!(
        dom0.read(N, "/local/domain/5/device/virtio/0/ring-ref")
            .unwrap(),
        b"8"
    );
}

#[test]
fn release_domain_fires_when_a_guest_dies() {
    let xsd = Xenstored::start();
    xsd.add_guest(5);
    let dom0 = xsd.client();
    let (_bridge, g5) = xsd.guest_client(5);
    g5.write(N, "device/virtio/0/state", b"4").unwrap();
    assert!(dom0.is_domain_introduced(5).unwrap());

    let released = dom0.watch_events_for("released").unwrap();
    dom0.watch("@releaseDomain", "released").unwrap();
    assert_eq!(
        released.next_timeout(WAIT).unwrap().unwrap().path,
        "@releaseDomain",
        "initial event"
    );

    xsd.kill_domain(5);
    let ev = released
        .next_timeout(WAIT)
        .unwrap()
        .expect("@releaseDomain within 5 s");
    assert_eq!(
        ev,
        WatchEvent {
            path: "@releaseDomain".into(),
            token: "released".into()
        }
    );
    assert!(!dom0.is_domain_introduced(5).unwrap());
    assert!(
        dom0.read(N, "/local/domain/5").unwrap_err().is_enoent(),
        "the dead domain's nodes are reaped"
    );
}

#[test]
fn the_daemon_killed_with_requests_in_flight_fails_them_within_a_second() {
    let mut xsd = Xenstored::start();
    let c = Arc::new(xsd.client());
    c.write(N, "/alive", b"1").unwrap();
    let events = c.watch_events();

    xsd.pause();
    let in_flight: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                let r = c.read(N, &format!("/alive/{i}"));
                (r, Instant::now())
            })
        })
        .collect();
    let watcher =
        std::thread::spawn(move || (events.next_timeout(Duration::from_secs(60)), Instant::now()));
    let sent = Instant::now();
    while c.pending_requests() < 8 {
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the requests were not all sent"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        c.pending_requests(),
        8,
        "the paused daemon holds the requests"
    );
    assert!(in_flight.iter().all(|t| !t.is_finished()));

    let killed = Instant::now();
    xsd.kill();
    for t in in_flight {
        let (r, at) = t.join().unwrap();
        let e = r.unwrap_err();
        assert!(e.is_connection_lost(), "{e}");
        assert!(
            at.duration_since(killed) < Duration::from_secs(1),
            "failed after {:?}",
            at.duration_since(killed)
        );
    }
    let (r, at) = watcher.join().unwrap();
    assert!(r.unwrap_err().is_connection_lost());
    assert!(at.duration_since(killed) < Duration::from_secs(1));

    let start = Instant::now();
    let e = c.write(N, "/later", b"x").unwrap_err();
    assert!(e.is_connection_lost(), "{e}");
    assert!(start.elapsed() < Duration::from_millis(100));
}

#[test]
fn a_xenbus_handshake_step_waits_on_the_peers_state() {
    let xsd = Xenstored::start();
    xsd.add_guest(5);
    let dom0 = xsd.client();
    let (_bridge, g5) = xsd.guest_client(5);
    let be = xenbus::backend_dir(0, 5, 0);
    let fe = xenbus::frontend_dir(5, 0);
    // As a toolstack does: the directory first, with its permissions, which the nodes
    // written into it then inherit.
    dom0.mkdir(N, &be).unwrap();
    dom0.set_perms(N, &be, &[Perm::owner(0), Perm::read(5)])
        .unwrap();
    dom0.write(N, &xenbus::state_path(&be), b"1").unwrap();
    g5.write(N, &xenbus::state_path(&fe), b"1").unwrap();

    let frontend = {
        let fe = fe.clone();
        let be = be.clone();
        std::thread::spawn(move || {
            let seen = xenbus::wait_for_state(
                &g5,
                &xenbus::state_path(&be),
                |s| s == XenbusState::InitWait,
                WAIT,
            )?;
            xenbus::switch_state(&g5, &fe, XenbusState::Initialised)?;
            Ok::<_, XsError>((seen, g5))
        })
    };
    xenbus::switch_state(&dom0, &be, XenbusState::InitWait).unwrap();
    let reached = xenbus::wait_for_state(
        &dom0,
        &xenbus::state_path(&fe),
        |s| s >= XenbusState::Initialised,
        WAIT,
    );
    let (seen, _g5) = frontend.join().unwrap().unwrap();
    assert_eq!(seen, XenbusState::InitWait);
    assert_eq!(reached.unwrap(), XenbusState::Initialised);

    let e = xenbus::wait_for_state(
        &dom0,
        &xenbus::state_path(&fe),
        |s| s == XenbusState::Connected,
        Duration::from_millis(150),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains(&xenbus::state_path(&fe)) && e.to_string().contains("Initialised"),
        "{e}"
    );
}
