//! MemStore against the rules of the C daemon. Each expectation here was also checked
//! against Debian's xenstored 4.17 (see `tests/tests/xenstored_differential.rs`).

use super::*;
use crate::{Transaction, transaction};
use std::time::Duration;

const N: TxId = TxId::NONE;

fn errno(r: Result<impl std::fmt::Debug, XsError>) -> Errno {
    match r {
        Ok(v) => panic!("expected an errno, got Ok({v:?})"),
        Err(e) => e
            .errno()
            .cloned()
            .unwrap_or_else(|| panic!("expected an errno, got {e}")),
    }
}

fn events(c: &MemConnection) -> Vec<(String, String)> {
    let q = c.watch_events();
    let mut out = Vec::new();
    while let Some(e) = q.try_next().unwrap() {
        out.push((e.path, e.token));
    }
    out
}

fn ev(p: &str, t: &str) -> (String, String) {
    (p.to_owned(), t.to_owned())
}

/// dom0, plus guests 5 and 7 set up the way a toolstack does.
fn setup() -> (MemStore, MemConnection, MemConnection, MemConnection) {
    let store = MemStore::new();
    store.start_guest(5).unwrap();
    store.start_guest(7).unwrap();
    let d0 = store.connect(0).unwrap();
    let g5 = store.connect(5).unwrap();
    let g7 = store.connect(7).unwrap();
    (store, d0, g5, g7)
}

#[test]
fn starts_with_the_daemons_initial_tree() {
    let c = MemStore::new().connect(0).unwrap();
    assert_eq!(c.directory(N, "/").unwrap(), vec!["tool"]);
    assert_eq!(c.directory(N, "/tool").unwrap(), vec!["xenstored"]);
    assert_eq!(c.get_perms(N, "/").unwrap(), vec![Perm::owner(0)]);
    assert_eq!(c.read(N, "/tool").unwrap(), b"");
}

#[test]
fn read_write_mkdir_rm_directory() {
    let c = MemStore::new().connect(0).unwrap();
    c.write(N, "/a/b/c", b"\x00\xffbytes").unwrap();
    assert_eq!(c.read(N, "/a/b/c").unwrap(), b"\x00\xffbytes");
    assert_eq!(
        c.read(N, "/a/b").unwrap(),
        b"",
        "missing parents are created empty"
    );
    c.mkdir(N, "/a/z").unwrap();
    c.mkdir(N, "/a/b").unwrap();
    c.write(N, "/a/m", b"").unwrap();
    assert_eq!(
        c.directory(N, "/a").unwrap(),
        vec!["b", "z", "m"],
        "creation order"
    );
    c.rm(N, "/a/b").unwrap();
    assert_eq!(c.directory(N, "/a").unwrap(), vec!["z", "m"]);
    assert_eq!(errno(c.read(N, "/a/b/c")), Errno::ENOENT);
    c.rm(N, "/a/absent").unwrap();
    assert_eq!(errno(c.rm(N, "/nope/absent")), Errno::ENOENT);
    assert_eq!(errno(c.rm(N, "/")), Errno::EINVAL);
    for bad in ["/a b", "/a/", "/a//b", "/a/é"] {
        assert_eq!(errno(c.write(N, bad, b"x")), Errno::EINVAL, "{bad}");
    }
    c.write(N, "rel", b"r").unwrap();
    assert_eq!(c.read(N, "/local/domain/0/rel").unwrap(), b"r");
    assert_eq!(c.get_domain_path(9).unwrap(), "/local/domain/9");
}

#[test]
fn path_length_limit_excludes_the_domain_home_prefix() {
    let c = MemStore::new().connect(0).unwrap();
    let under_home = format!("/local/domain/3/{}", "a".repeat(REL_PATH_MAX));
    c.write(N, &under_home, b"").unwrap();
    let elsewhere = format!("/{}", "a".repeat(REL_PATH_MAX));
    assert_eq!(errno(c.write(N, &elsewhere, b"")), Errno::EINVAL);
}

#[test]
fn guests_are_confined_to_what_permissions_allow() {
    let (_s, d0, g5, g7) = setup();
    d0.write(N, "/local/domain/0/secret", b"s").unwrap();
    g5.write(N, "/local/domain/5/device/vif/0/state", b"1")
        .unwrap();
    assert_eq!(
        g5.read(N, "device/vif/0/state").unwrap(),
        b"1",
        "relative to the home"
    );
    assert_eq!(errno(g5.read(N, "/local/domain/0/secret")), Errno::EACCES);
    assert_eq!(
        errno(g5.read(N, "/local/domain/0/absent")),
        Errno::EACCES,
        "no hint that it is absent"
    );
    assert_eq!(errno(g5.read(N, "/local/domain/5/absent")), Errno::ENOENT);
    assert_eq!(errno(g5.write(N, "/foo/x", b"y")), Errno::EACCES);
    assert_eq!(errno(g5.mkdir(N, "/local/domain/7/x")), Errno::EACCES);
    assert_eq!(errno(g5.rm(N, "/local/domain/7/absent")), Errno::EACCES);
    assert_eq!(errno(g7.read(N, "/local/domain/5/device")), Errno::EACCES);

    // A grant of r7 lets domain 7 read, not write.
    g5.set_perms(
        N,
        "/local/domain/5/device",
        &[Perm::owner(5), Perm::read(7)],
    )
    .unwrap();
    assert_eq!(g7.read(N, "/local/domain/5/device").unwrap(), b"");
    assert_eq!(
        g7.directory(N, "/local/domain/5/device").unwrap(),
        vec!["vif"]
    );
    assert_eq!(
        errno(g7.write(N, "/local/domain/5/device", b"x")),
        Errno::EACCES
    );
    // Children created before the grant keep their own permissions.
    assert_eq!(
        errno(g7.read(N, "/local/domain/5/device/vif")),
        Errno::EACCES
    );
    // A b7 grant allows writes, and what 7 creates there belongs to 7.
    g5.set_perms(
        N,
        "/local/domain/5/device",
        &[Perm::owner(5), Perm::both(7)],
    )
    .unwrap();
    g7.write(N, "/local/domain/5/device/from7", b"hi").unwrap();
    assert_eq!(
        d0.get_perms(N, "/local/domain/5/device/from7").unwrap(),
        vec![Perm::owner(7), Perm::both(7)]
    );
    // Privileged writers inherit the parent's owner.
    d0.write(N, "/local/domain/5/fromdom0", b"x").unwrap();
    assert_eq!(
        d0.get_perms(N, "/local/domain/5/fromdom0").unwrap(),
        vec![Perm::owner(5)]
    );
    // Guests may not give nodes away, nor ask privileged questions.
    assert_eq!(
        errno(g5.set_perms(N, "device", &[Perm::owner(7)])),
        Errno::EPERM
    );
    assert_eq!(
        errno(g7.set_perms(N, "/local/domain/5/device", &[Perm::owner(5)])),
        Errno::EACCES
    );
    assert_eq!(errno(g5.is_domain_introduced(5)), Errno::EACCES);
    assert!(d0.is_domain_introduced(5).unwrap());
    assert!(!d0.is_domain_introduced(9).unwrap());
    assert!(d0.is_domain_introduced(DOMID_SELF).unwrap());
}

#[test]
fn permissions_may_only_name_existing_domains() {
    let (_s, d0, g5, _g7) = setup();
    d0.write(N, "/p", b"").unwrap();
    assert_eq!(
        errno(d0.set_perms(N, "/p", &[Perm::owner(9)])),
        Errno::ENOENT
    );
    d0.set_perms(N, "/p", &[Perm::owner(0), Perm::read(9), Perm::read(5)])
        .unwrap();
    assert_eq!(
        d0.get_perms(N, "/p").unwrap(),
        vec![Perm::owner(0), Perm::read(9), Perm::read(5)]
    );
    assert_eq!(g5.read(N, "/p").unwrap(), b"");
    let six: Vec<Perm> = (1..=6).map(|_| Perm::read(7)).collect();
    let mut perms = vec![Perm::owner(5)];
    perms.extend(six);
    assert_eq!(errno(g5.set_perms(N, "device", &perms)), Errno::ENOSPC);
}

#[test]
fn guest_node_size_quota_matches_the_daemon() {
    let (_s, d0, g5, _g7) = setup();
    // Record = 24-byte header + 8 per permission + value: below 2048 for guests.
    g5.write(N, "v", &[b'x'; 2015]).unwrap();
    assert_eq!(errno(g5.write(N, "v", &[b'x'; 2016])), Errno::ENOSPC);
    assert_eq!(
        g5.read(N, "v").unwrap().len(),
        2015,
        "a refused write changes nothing"
    );
    d0.write(N, "/local/domain/5/big", &[b'x'; 4000]).unwrap();
}

#[test]
fn watches_fire_for_the_path_and_descendants_with_an_initial_event() {
    let (_s, d0, g5, _g7) = setup();
    d0.watch("/local/domain/5", "t").unwrap();
    assert_eq!(events(&d0), vec![ev("/local/domain/5", "t")]);
    // Drained after each step: pending events of one token fold into one (watch.rs).
    g5.write(N, "device/x", b"1").unwrap();
    assert_eq!(events(&d0), vec![ev("/local/domain/5/device/x", "t")]);
    d0.write(N, "/local/domain/50", b"not a descendant")
        .unwrap();
    assert_eq!(events(&d0), vec![], "not a descendant");
    d0.write(N, "/local/domain/5/device/x", b"2").unwrap();
    assert_eq!(events(&d0), vec![ev("/local/domain/5/device/x", "t")]);
    d0.rm(N, "/local/domain/5/device/absent").unwrap();
    assert_eq!(
        events(&d0),
        vec![],
        "an rm that removes nothing fires nothing"
    );
    assert_eq!(errno(d0.watch("/local/domain/5", "t")), Errno::EEXIST);
    d0.watch("/local/domain/5", "t2").unwrap();
    d0.unwatch("/local/domain/5", "t").unwrap();
    assert_eq!(errno(d0.unwatch("/local/domain/5", "t")), Errno::ENOENT);
    assert_eq!(events(&d0), vec![ev("/local/domain/5", "t2")]);
    d0.mkdir(N, "/local/domain/5/m").unwrap();
    assert_eq!(events(&d0), vec![ev("/local/domain/5/m", "t2")]);
}

#[test]
fn rm_fires_exact_events_for_removed_descendants() {
    let c = MemStore::new().connect(0).unwrap();
    c.write(N, "/a/b/c", b"").unwrap();
    c.watch("/a", "top").unwrap();
    c.watch("/a/b/c", "deep").unwrap();
    c.watch("/a/b/c/none", "below").unwrap();
    let _ = events(&c);
    c.rm(N, "/a").unwrap();
    assert_eq!(events(&c), vec![ev("/a/b/c", "deep"), ev("/a", "top")]);
}

#[test]
fn relative_watches_report_relative_paths() {
    let (_s, _d0, g5, _g7) = setup();
    g5.watch("device", "rel").unwrap();
    assert_eq!(events(&g5), vec![ev("device", "rel")]);
    g5.write(N, "device/a", b"1").unwrap();
    assert_eq!(events(&g5), vec![ev("device/a", "rel")]);
}

#[test]
fn watch_events_need_read_permission_on_the_node_or_its_parent() {
    let (_s, d0, g5, _g7) = setup();
    d0.write(N, "/tool/q", b"").unwrap();
    g5.watch("/tool", "t").unwrap();
    assert_eq!(
        events(&g5),
        vec![ev("/tool", "t")],
        "the initial event is unconditional"
    );
    d0.write(N, "/tool/q", b"x").unwrap();
    assert_eq!(events(&g5), vec![]);
    d0.set_perms(N, "/tool", &[Perm::owner(0), Perm::read(5)])
        .unwrap();
    assert_eq!(events(&g5), vec![ev("/tool", "t")], "set_perms fires");
    d0.write(N, "/tool/q", b"y").unwrap();
    assert_eq!(
        events(&g5),
        vec![ev("/tool/q", "t")],
        "readable parent is enough"
    );
}

#[test]
fn special_watches_and_domain_death() {
    let (s, d0, g5, g7) = setup();
    g5.write(N, "device/x", b"1").unwrap();
    d0.write(N, "/local/domain/7/shared", b"").unwrap();
    d0.set_perms(
        N,
        "/local/domain/7/shared",
        &[Perm::owner(7), Perm::read(5)],
    )
    .unwrap();
    d0.watch("@introduceDomain", "intro").unwrap();
    d0.watch("@releaseDomain", "rel").unwrap();
    d0.watch("/local/domain/5", "home5").unwrap();
    g7.watch("@releaseDomain", "rel7").unwrap();
    let _ = events(&d0);
    assert_eq!(events(&g7), vec![ev("@releaseDomain", "rel7")]);

    s.introduce_domain(9);
    assert_eq!(events(&d0), vec![ev("@introduceDomain", "intro")]);
    s.destroy_domain(5);
    assert!(!d0.is_domain_introduced(5).unwrap());
    assert_eq!(
        errno(d0.read(N, "/local/domain/5")),
        Errno::ENOENT,
        "its nodes are reaped"
    );
    let got = events(&d0);
    assert!(got.contains(&ev("@releaseDomain", "rel")), "{got:?}");
    assert!(got.contains(&ev("/local/domain/5", "home5")), "{got:?}");
    assert_eq!(
        events(&g7),
        vec![],
        "guests need read access to @releaseDomain"
    );
    assert!(g5.read(N, "device/x").unwrap_err().is_connection_lost());
    assert!(g5.watch_events().is_closed());
    // Its grants no longer count, so a new domain 5 does not inherit them.
    assert_eq!(
        d0.get_perms(N, "/local/domain/7/shared").unwrap(),
        vec![Perm::owner(7), Perm::read(5)]
    );
    s.start_guest(5).unwrap();
    let new5 = s.connect(5).unwrap();
    assert_eq!(errno(new5.read(N, "/local/domain/7/shared")), Errno::EACCES);

    d0.set_perms(N, "@releaseDomain", &[Perm::owner(0), Perm::read(7)])
        .unwrap();
    s.destroy_domain(5);
    assert_eq!(events(&g7), vec![ev("@releaseDomain", "rel7")]);
    assert_eq!(
        errno(g7.set_perms(N, "@releaseDomain", &[Perm::owner(7)])),
        Errno::EACCES
    );
    assert_eq!(
        errno(d0.set_perms(N, "@other", &[Perm::owner(0)])),
        Errno::EINVAL
    );
}

#[test]
fn transactions_are_isolated_until_commit_and_fire_watches_at_commit() {
    let store = MemStore::new();
    let a = store.connect(0).unwrap();
    let b = store.connect(0).unwrap();
    b.watch("/t", "w").unwrap();
    let _ = events(&b);
    let tx = a.transaction_start().unwrap();
    a.write(tx, "/t/x", b"1").unwrap();
    assert_eq!(a.read(tx, "/t/x").unwrap(), b"1");
    assert_eq!(errno(a.read(N, "/t/x")), Errno::ENOENT);
    assert_eq!(errno(b.read(N, "/t/x")), Errno::ENOENT);
    assert_eq!(events(&b), vec![], "no event before the commit");
    a.transaction_end(tx, true).unwrap();
    assert_eq!(b.read(N, "/t/x").unwrap(), b"1");
    assert_eq!(
        events(&b),
        vec![ev("/t/x", "w")],
        "one event for the written node, none for created parents"
    );

    let tx = a.transaction_start().unwrap();
    a.write(tx, "/t/x", b"2").unwrap();
    a.transaction_end(tx, false).unwrap();
    assert_eq!(b.read(N, "/t/x").unwrap(), b"1", "an abort discards");
    assert_eq!(events(&b), vec![]);
    assert_eq!(
        errno(a.transaction_end(tx, true)),
        Errno::ENOENT,
        "it is gone"
    );
    assert_eq!(errno(a.read(TxId(99), "/t/x")), Errno::ENOENT);
    assert_eq!(errno(b.transaction_end(N, true)), Errno::ENOENT);
}

#[test]
fn a_commit_conflicts_when_something_it_read_changed() {
    let store = MemStore::new();
    let a = store.connect(0).unwrap();
    let b = store.connect(0).unwrap();
    a.write(N, "/c/x", b"0").unwrap();
    a.write(N, "/c/y", b"0").unwrap();

    // Read then concurrently changed: EAGAIN.
    let tx = a.transaction_start().unwrap();
    assert_eq!(a.read(tx, "/c/x").unwrap(), b"0");
    b.write(N, "/c/x", b"1").unwrap();
    a.write(tx, "/c/y", b"from tx").unwrap();
    assert_eq!(errno(a.transaction_end(tx, true)), Errno::EAGAIN);
    assert_eq!(
        b.read(N, "/c/y").unwrap(),
        b"0",
        "nothing of a failed commit is applied"
    );

    // Unrelated concurrent writes do not conflict.
    let tx = a.transaction_start().unwrap();
    a.read(tx, "/c/x").unwrap();
    b.write(N, "/elsewhere", b"1").unwrap();
    a.write(tx, "/c/y", b"1").unwrap();
    a.transaction_end(tx, true).unwrap();

    // A node read as absent and then created concurrently conflicts too.
    let tx = a.transaction_start().unwrap();
    assert_eq!(errno(a.read(tx, "/c/new")), Errno::ENOENT);
    b.write(N, "/c/new", b"1").unwrap();
    assert_eq!(errno(a.transaction_end(tx, true)), Errno::EAGAIN);

    // Changes made before the first access in the transaction do not conflict.
    let tx = a.transaction_start().unwrap();
    b.write(N, "/c/x", b"2").unwrap();
    assert_eq!(a.read(tx, "/c/x").unwrap(), b"2");
    a.transaction_end(tx, true).unwrap();

    // Deleting a node the transaction read conflicts.
    let tx = a.transaction_start().unwrap();
    a.read(tx, "/c/y").unwrap();
    b.rm(N, "/c/y").unwrap();
    assert_eq!(errno(a.transaction_end(tx, true)), Errno::EAGAIN);
}

#[test]
fn retry_helper_retries_conflicts_then_reports_exhaustion() {
    let store = MemStore::new();
    let a = store.connect(0).unwrap();
    let b = store.connect(0).unwrap();
    a.write(N, "/counter", b"0").unwrap();
    let mut runs = 0;
    let v = transaction(&a, 5, |tx| {
        runs += 1;
        let n: u32 = String::from_utf8(a.read(tx, "/counter")?)
            .unwrap()
            .parse()
            .unwrap();
        if runs < 3 {
            b.write(N, "/counter", (n + 10).to_string().as_bytes())?;
        }
        a.write(tx, "/counter", (n + 1).to_string().as_bytes())?;
        Ok(n + 1)
    })
    .unwrap();
    assert_eq!(runs, 3);
    assert_eq!(v, 21);
    assert_eq!(a.read(N, "/counter").unwrap(), b"21");

    let mut runs = 0;
    let e = transaction(&a, 4, |tx| {
        runs += 1;
        a.read(tx, "/counter")?;
        b.write(N, "/counter", b"x")?;
        Ok(())
    })
    .unwrap_err();
    assert_eq!(runs, 4);
    assert!(
        matches!(e, XsError::TransactionRetriesExhausted { attempts: 4 }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "xenstore transaction still conflicted (EAGAIN) after 4 attempts"
    );

    let e = transaction(&a, 4, |_| {
        Err::<(), _>(XsError::daemon(MsgType::Read, "/x", Errno::EACCES))
    })
    .unwrap_err();
    assert!(e.is_eacces(), "other errors are returned at once: {e}");
}

#[test]
fn transaction_guard_aborts_on_drop() {
    let store = MemStore::new();
    let a = store.connect(0).unwrap();
    {
        let tx = Transaction::start(&a).unwrap();
        a.write(tx.id(), "/g", b"1").unwrap();
    }
    assert!(!a.exists(N, "/g").unwrap());
    let tx = Transaction::start(&a).unwrap();
    a.write(tx.id(), "/g", b"2").unwrap();
    tx.commit().unwrap();
    assert_eq!(a.read(N, "/g").unwrap(), b"2");
}

#[test]
fn guest_transaction_quota() {
    let (_s, _d0, g5, _g7) = setup();
    for _ in 0..=QUOTA_TRANSACTIONS {
        g5.transaction_start().unwrap();
    }
    assert_eq!(errno(g5.transaction_start()), Errno::ENOSPC);
    g5.reset_watches().unwrap();
    g5.transaction_start().unwrap();
}

#[test]
fn closing_a_connection_drops_its_watches_and_transactions() {
    let store = MemStore::new();
    let a = store.connect(0).unwrap();
    a.watch("/", "root").unwrap();
    let q = a.watch_events();
    let tx = a.transaction_start().unwrap();
    a.write(tx, "/never", b"").unwrap();
    drop(a);
    assert_eq!(
        q.try_next().unwrap(),
        Some(WatchEvent {
            path: "/".into(),
            token: "root".into()
        })
    );
    assert!(q.try_next().unwrap_err().is_connection_lost());
    let b = store.connect(0).unwrap();
    assert!(!b.exists(N, "/never").unwrap());
    assert_eq!(store.lock().conns.len(), 1);
}

#[test]
fn disconnect_all_fails_later_requests_and_wakes_waiters() {
    let store = MemStore::new();
    let a = store.connect(0).unwrap();
    let q = a.watch_events();
    let t = std::thread::spawn(move || q.next_timeout(Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(20));
    store.disconnect_all("stopped for the test");
    assert!(t.join().unwrap().unwrap_err().is_connection_lost());
    let e = a.read(N, "/").unwrap_err();
    assert!(e.to_string().contains("stopped for the test"), "{e}");
}

#[test]
fn client_side_limits_apply_before_the_store_is_touched() {
    let c = MemStore::new().connect(0).unwrap();
    assert!(matches!(
        c.write(N, "/a", &[0; 4094]),
        Err(XsError::ValueTooLong { .. })
    ));
    assert!(matches!(
        c.read(N, &"r".repeat(2049)),
        Err(XsError::PathTooLong { .. })
    ));
    assert!(matches!(
        c.watch("/a", "t\0"),
        Err(XsError::InvalidArgument { .. })
    ));
}

#[test]
fn usable_as_a_shared_trait_object() {
    let store = MemStore::new();
    let c: Arc<dyn XenStore> = Arc::new(store.connect(0).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                for j in 0..50 {
                    c.write(N, &format!("/par/{i}/{j}"), b"v").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(c.directory(N, "/par").unwrap().len(), 4);
}

/// Issue 13, finding 1 (XSA-349's class): a guest that rewrites its watched `state` node, and
/// long-named children of it, in a loop while the watcher is busy must not grow the watcher's
/// queue. The queue holds at most one event per token, and the watcher still learns that
/// something under the watch changed, and of every change after it drains.
#[test]
fn hostile_watch_flood() {
    let (_s, d0, g5, _g7) = setup();
    let fdir = "/local/domain/5/device/virtio/0";
    let state = format!("{fdir}/state");
    g5.write(N, "device/virtio/0/state", b"1").unwrap();
    let q = d0.watch_events_for("fe").unwrap();
    d0.watch(&state, "fe").unwrap();
    assert_eq!(
        q.try_next().unwrap(),
        Some(WatchEvent {
            path: state.clone(),
            token: "fe".into()
        }),
        "the event of setting the watch"
    );
    const WRITES: usize = 200_000;
    let long = "x".repeat(200);
    let mut longest = 0;
    for i in 0..WRITES {
        if i % 2 == 0 {
            g5.write(N, "device/virtio/0/state", b"4").unwrap();
        } else {
            // Eight children: their names fill the parent's record up to the guest quota.
            let child = format!("device/virtio/0/state/{long}{}", i % 8);
            g5.write(N, &child, b"x").unwrap();
        }
        longest = longest.max(q.len());
    }
    assert_eq!(
        longest, 1,
        "{WRITES} writes while nobody drained: at most one pending event for the token"
    );
    let got = q.try_next().unwrap().expect("the flood is not lost");
    assert_eq!(got.token, "fe");
    assert_eq!(
        got.path, state,
        "the event names a node that holds every path folded into it"
    );
    assert_eq!(q.try_next().unwrap(), None);
    // After the flood, every change is seen again, with its own path.
    g5.write(N, "device/virtio/0/state", b"5").unwrap();
    assert_eq!(
        q.try_next().unwrap(),
        Some(WatchEvent {
            path: state.clone(),
            token: "fe".into()
        })
    );
    assert_eq!(
        d0.read(N, &state).unwrap(),
        b"5",
        "the consumer re-reads and sees the last value"
    );
}
