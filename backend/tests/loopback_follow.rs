//! Devices follow their domain (issue 16 item 2), against the in-process daemon: a dead
//! guest's backend entries are removed by the daemon, and a guest that appears with a name the
//! device book knows (a reboot's new domid, `xl create` again) gets its devices back, also
//! when it happened while no daemon ran.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use xenvirtio_backend::admin::{AttachRequest, BookEntry, DeviceBook};
use xenvirtio_backend::daemon::DaemonConfig;
use xenvirtio_backend::test_utils::TestStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xen::DomId;
use xenvirtio_xenstore::{Perm, TxId};

/// What libxl does to create a domain: its home and name first, then the introduction (so
/// `@introduceDomain` finds the name).
fn create_named(w: &World, domid: DomId, name: &str) {
    w.xs.create_domain(domid);
    let home = format!("/local/domain/{domid}");
    w.dom0.mkdir(TxId::NONE, &home).unwrap();
    w.dom0
        .set_perms(TxId::NONE, &home, &[Perm::owner(domid)])
        .unwrap();
    w.dom0
        .write_str(TxId::NONE, &format!("{home}/name"), name)
        .unwrap();
    w.xs.introduce_domain(domid);
}

fn backend_devids(w: &World, domid: DomId) -> Vec<String> {
    w.dom0
        .directory(
            TxId::NONE,
            &format!("/local/domain/0/backend/virtio/{domid}"),
        )
        .unwrap_or_default()
}

fn config(state: &std::path::Path) -> DaemonConfig {
    DaemonConfig {
        state_dir: Some(state.to_path_buf()),
        ..DaemonConfig::default()
    }
}

#[test]
fn a_rebooted_guest_gets_its_devices_back_and_a_dead_one_leaves_no_entry() {
    let state = tempfile::tempdir().unwrap();
    let w = World::with_config(config(state.path()));
    let image = w.image("web.img", 128);
    let book = DeviceBook::new(state.path());
    book.record("web", BookEntry::of(&AttachRequest::blk(0, &image), 0))
        .unwrap();
    book.record(
        "web",
        BookEntry::of(&AttachRequest::new(0, DeviceKind::Rng), 2),
    )
    .unwrap();

    for (boot, domid) in [(1, 5), (2, 6)] {
        // The domain appears (first boot, then a reboot's new domid): its devices come back.
        create_named(&w, domid, "web");
        eventually(
            &format!("boot {boot}: devices 0 and 2 of domid {domid}"),
            || backend_devids(&w, domid) == ["0", "2"],
        );
        let params = w
            .dom0
            .read_string(
                TxId::NONE,
                &format!("/local/domain/0/backend/virtio/{domid}/0/params"),
            )
            .unwrap();
        assert_eq!(params, image.display().to_string());
        // They are real devices: the guest uses its disk.
        let mut fe = w.connect(domid, 0, options(TestStrategy::GrantPersistent));
        fe.blk_write(0, 8, &[boot as u8; 512]).unwrap();
        assert_eq!(fe.blk_read(0, 8, 512).unwrap(), vec![boot as u8; 512]);
        drop(fe);
        // It dies: the daemon removes what it had, with no command.
        w.xs.destroy_domain(domid);
        eventually(&format!("boot {boot}: no entry of domid {domid}"), || {
            backend_devids(&w, domid).is_empty()
        });
    }
    assert_eq!(read_file_range(&image, 8 * 512, 512), vec![2u8; 512]);
    // A domain whose name has no book gets nothing.
    create_named(&w, 7, "other");
    std::thread::sleep(Duration::from_millis(300));
    assert!(backend_devids(&w, 7).is_empty());
}

#[test]
fn what_happened_while_no_daemon_ran_is_caught_up_at_start() {
    let state = tempfile::tempdir().unwrap();
    let mut w = World::with_config(config(state.path()));
    let book = DeviceBook::new(state.path());
    book.record(
        "db",
        BookEntry::of(&AttachRequest::new(0, DeviceKind::Rng), 1),
    )
    .unwrap();
    create_named(&w, 5, "db");
    eventually("domid 5 gets its device", || backend_devids(&w, 5) == ["1"]);
    w.stop_daemon();
    // While the daemon is down: the guest reboots (domid 5 dies, domid 6 appears).
    w.xs.destroy_domain(5);
    create_named(&w, 6, "db");
    assert_eq!(backend_devids(&w, 5), ["1"], "nobody removed it yet");
    w.start_daemon();
    eventually("the dead domid's entries go", || {
        backend_devids(&w, 5).is_empty()
    });
    eventually("the new domid gets the device", || {
        backend_devids(&w, 6) == ["1"]
    });
}

#[test]
fn a_remembered_device_that_cannot_be_attached_does_not_stop_the_others() {
    let state = tempfile::tempdir().unwrap();
    let w = World::with_config(config(state.path()));
    let book = DeviceBook::new(state.path());
    let gone = w.dir.path().join("deleted.img");
    book.record("app", BookEntry::of(&AttachRequest::blk(0, &gone), 0))
        .unwrap();
    book.record(
        "app",
        BookEntry::of(&AttachRequest::new(0, DeviceKind::Rng), 1),
    )
    .unwrap();
    create_named(&w, 5, "app");
    eventually("the rng device comes back", || {
        backend_devids(&w, 5) == ["1"]
    });
}
