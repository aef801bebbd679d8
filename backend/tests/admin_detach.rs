//! `xenvirtio-backend detach` against Debian's real xenstored: with a backend that closes,
//! with one that never answers (safe by default, removed with --force), and with none at all.
#![allow(clippy::unwrap_used)]

mod admin_support;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use admin_support::{Host, N};
use xenvirtio_xenstore::{XenStore, XsClient};

/// Plays the backend of PROTOCOL 8.3 on `conn`: watches the state, and when the toolstack
/// writes Closing with online=0, closes (after a short delay, so that detach really waits).
fn closing_backend(conn: XsClient, bdir: String) -> JoinHandle<Duration> {
    let state = format!("{bdir}/state");
    let events = conn.watch_events_for("backend").unwrap();
    conn.watch(&state, "backend").unwrap();
    std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            events
                .next_timeout(Duration::from_secs(20))
                .unwrap()
                .expect("detach asks the backend to close within 20 s");
            if conn.read(N, &state).unwrap() == b"5" {
                assert_eq!(conn.read(N, &format!("{bdir}/online")).unwrap(), b"0");
                std::thread::sleep(Duration::from_millis(100));
                conn.write(N, &state, b"6").unwrap();
                return start.elapsed();
            }
        }
    })
}

#[test]
fn a_dom0_backend_that_closes_gets_its_device_removed_after_closed() {
    let host = Host::start();
    let run = host.ok(&["attach", "--domain", "guest1", "--type", "rng"]);
    let keep = host.ok(&["attach", "--domain", "guest1", "--type", "rng"]);
    let (bdir, fdir) = (run.field("backend"), run.field("frontend"));
    host.dom0.write(N, &format!("{bdir}/state"), b"4").unwrap();
    let backend = closing_backend(host.xsd.client(), bdir.clone());

    let start = Instant::now();
    let out = host.ok(&["detach", "--domain", "guest1", "--devid", "0"]);
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "it waited for Closed"
    );
    backend.join().unwrap();
    assert_eq!(out.stdout, "detached virtio device 0 of domain 5\n");
    assert!(!out.stderr.contains("warning"), "{out}");
    assert!(!host.exists(&bdir) && !host.exists(&fdir));
    assert!(host.exists(&keep.field("backend")) && host.exists(&keep.field("frontend")));
}

#[test]
fn a_driver_domain_backend_closes_with_its_own_permissions() {
    let host = Host::start();
    let run = host.ok(&[
        "attach",
        "--domain",
        "5",
        "--type",
        "rng",
        "--backend-domain",
        "7",
    ]);
    let (bdir, fdir) = (run.field("backend"), run.field("frontend"));
    let (_bridge, storage) = host.xsd.guest_client(7);
    storage.write(N, &format!("{bdir}/state"), b"4").unwrap();
    let backend = closing_backend(storage, bdir.clone());
    host.ok(&[
        "detach",
        "--domain",
        "guest1",
        "--devid",
        "0",
        "--backend-domain",
        "storage",
    ]);
    backend.join().unwrap();
    assert!(!host.exists(&bdir) && !host.exists(&fdir));
    assert!(
        !host.exists("/local/domain/7/backend/virtio/5"),
        "no empty leftovers"
    );
}

#[test]
fn a_silent_backend_times_out_leaves_the_device_then_force_removes_it() {
    let host = Host::start();
    let run = host.ok(&["attach", "--domain", "guest1", "--type", "rng"]);
    let (bdir, fdir) = (run.field("backend"), run.field("frontend"));
    // A backend connected the device, then died: nobody will write Closed.
    host.dom0.write(N, &format!("{bdir}/state"), b"4").unwrap();

    let start = Instant::now();
    let out = host.run(&[
        "detach",
        "--domain",
        "guest1",
        "--devid",
        "0",
        "--timeout",
        "0.5",
    ]);
    assert!(start.elapsed() >= Duration::from_millis(500));
    out.refused_with("did not reach Closed within 0.5s (state: Closing (5))");
    assert!(out.stderr.contains("--force"), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {out}");
    assert_eq!(host.read(&format!("{bdir}/online")), "0");
    assert_eq!(host.read(&format!("{bdir}/state")), "5");
    assert!(host.exists(&fdir), "left in place without --force");

    let out = host.ok(&[
        "detach",
        "--domain",
        "guest1",
        "--devid",
        "0",
        "--timeout",
        "0.3",
        "--force",
    ]);
    assert!(
        out.stderr
            .contains("warning: the backend did not reach Closed within 0.3s")
            && out
                .stderr
                .contains("removed virtio device 0 of domain 5 anyway"),
        "{out}"
    );
    assert!(!host.exists(&bdir) && !host.exists(&fdir));
}

#[test]
fn a_device_no_backend_ever_took_is_removed_at_once() {
    let host = Host::start();
    let run = host.ok(&[
        "attach",
        "--domain",
        "guest1",
        "--type",
        "blk",
        "--image",
        admin_support::s(&host.image("d.img")),
    ]);
    let start = Instant::now();
    let out = host.ok(&["detach", "--domain", "guest1", "--devid", "0"]);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "no wait for a backend that held nothing"
    );
    assert!(out.stderr.is_empty(), "{out}");
    assert!(!host.exists(&run.field("backend")) && !host.exists(&run.field("frontend")));
    assert!(!host.exists("/local/domain/0/backend/virtio/5"));
}

#[test]
fn the_leftovers_of_a_destroyed_guest_are_detached_by_domid() {
    let host = Host::start();
    let run = host.ok(&["attach", "--domain", "guest1", "--type", "rng"]);
    let bdir = run.field("backend");
    // The backend saw the domain die and closed (PROTOCOL 8.4); the toolstack removed the
    // guest's home, as libxl does when it destroys a domain.
    host.dom0.write(N, &format!("{bdir}/state"), b"6").unwrap();
    host.xsd.kill_domain(5);
    host.dom0.rm(N, "/local/domain/5").unwrap();
    host.run(&["detach", "--domain", "guest1", "--devid", "0"])
        .refused_with("no domain is named \"guest1\"");
    let out = host.ok(&["detach", "--domain", "5", "--devid", "0"]);
    assert!(out.stderr.is_empty(), "{out}");
    assert!(!host.exists(&bdir));
    assert!(!host.exists("/local/domain/0/backend/virtio/5"));
}

#[test]
fn unknown_devices_and_domains_are_refused() {
    let host = Host::start();
    host.run(&["detach", "--domain", "guest1", "--devid", "3"])
        .refused_with("domain 5 has no virtio device 3 served by domain 0");
    host.run(&["detach", "--domain", "nosuch", "--devid", "0"])
        .refused_with("no domain is named \"nosuch\"");
    host.run(&["detach", "--domain", "42", "--devid", "0"])
        .refused_with("domain 42 does not exist");
    host.run(&["detach", "--domain", "guest1"])
        .refused_with("--devid");
}
