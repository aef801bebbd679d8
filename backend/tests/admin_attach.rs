//! `xenvirtio-backend attach` against Debian's real xenstored: the keys, their values and
//! permissions, devid choice, name resolution, and permissions that hold for real guests.
#![allow(clippy::unwrap_used)]

mod admin_support;

use std::collections::BTreeMap;

use admin_support::{Host, N, perms, s};
use xenvirtio_xenstore::{Perm, XenStore};

type Tree = BTreeMap<String, (String, Vec<Perm>)>;

fn expect(keys: &[(&str, &str)], perms: &[Perm]) -> Tree {
    keys.iter()
        .map(|(k, v)| ((*k).to_owned(), ((*v).to_owned(), perms.to_vec())))
        .collect()
}

#[test]
fn each_type_creates_exactly_the_toolstack_keys_with_the_protocol_permissions() {
    let host = Host::start();
    let image = host.image("guest1.img");
    let sock = host.dir.path().join("hvc.sock");

    let blk = host.ok(&[
        "attach",
        "--domain",
        "guest1",
        "--type",
        "blk",
        "--image",
        s(&image),
        "--queues",
        "4",
    ]);
    assert_eq!(blk.field("devid"), "0");
    assert_eq!(blk.field("backend"), "/local/domain/0/backend/virtio/5/0");
    assert_eq!(blk.field("frontend"), "/local/domain/5/device/virtio/0");
    let console = host.ok(&[
        "attach",
        "--domain",
        "5",
        "--type",
        "console",
        "--console",
        &format!("socket:{}", sock.display()),
    ]);
    assert_eq!(
        console.field("devid"),
        "1",
        "a second attach picks the next devid"
    );
    let rng = host.ok(&[
        "attach", "--domain", "guest1", "--type", "rng", "--dma", "bounce",
    ]);
    assert_eq!(rng.field("devid"), "2");

    let be = perms(0, 5);
    let fe = perms(5, 0);
    let common = |devid: &str, type_: &str, dma: &str| -> Vec<(String, String)> {
        [
            ("frontend", format!("/local/domain/5/device/virtio/{devid}")),
            ("frontend-id", "5".into()),
            ("online", "1".into()),
            ("state", "1".into()),
            ("type", type_.into()),
            ("transport", "xenbus".into()),
            ("grant_usage", "0".into()),
            ("dma", dma.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    let with = |mut keys: Vec<(String, String)>, extra: &[(&str, &str)]| -> Tree {
        keys.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        keys.into_iter()
            .map(|(k, v)| (k, (v, be.clone())))
            .collect()
    };
    let cases = [
        (
            &blk,
            with(
                common("0", "virtio,device2", "auto"),
                &[
                    ("params", s(&image)),
                    ("mode", "w"),
                    ("requested-queues", "4"),
                ],
            ),
        ),
        (
            &console,
            with(
                common("1", "virtio,device3", "auto"),
                &[("console", &format!("socket:{}", sock.display()))],
            ),
        ),
        (&rng, with(common("2", "virtio,device4", "bounce"), &[])),
    ];
    for (run, expected) in cases {
        let (bdir, fdir) = (run.field("backend"), run.field("frontend"));
        assert_eq!(host.dom0.get_perms(N, &bdir).unwrap(), be, "{bdir}");
        assert_eq!(host.dom0.get_perms(N, &fdir).unwrap(), fe, "{fdir}");
        assert_eq!(host.tree(&bdir), expected, "{bdir}");
        assert_eq!(
            host.tree(&fdir),
            expect(
                &[("backend", &bdir), ("backend-id", "0"), ("state", "1")],
                &fe
            ),
            "{fdir}"
        );
    }
    // The guest's device/ is the toolstack's, readable by the guest (as libxl makes it).
    for p in ["/local/domain/5/device", "/local/domain/5/device/virtio"] {
        assert_eq!(host.dom0.get_perms(N, p).unwrap(), perms(0, 5), "{p}");
    }
}

#[test]
fn readonly_direct_devid_and_a_frontend_in_dom0() {
    let host = Host::start();
    let image = host.image("ro.img");
    let run = host.ok(&[
        "attach",
        "--domain",
        "guest2",
        "--type",
        "blk",
        "--image",
        s(&image),
        "--readonly",
        "--devid",
        "7",
        "--dma",
        "direct",
    ]);
    assert_eq!(run.field("devid"), "7");
    let t = host.tree("/local/domain/0/backend/virtio/6/7");
    assert_eq!(t["mode"].0, "r");
    assert_eq!(t["dma"].0, "direct");
    assert_eq!(
        t["grant_usage"].0, "0",
        "libxl's default for a Dom0 backend"
    );
    assert!(!t.contains_key("requested-queues"));

    // Frontend and backend both in Dom0: the permissions collapse to n0.
    let run = host.ok(&["attach", "--domain", "Domain-0", "--type", "rng"]);
    for key in ["backend", "frontend"] {
        let dir = run.field(key);
        assert_eq!(
            host.dom0.get_perms(N, &dir).unwrap(),
            [Perm::owner(0)],
            "{dir}"
        );
    }
    assert_eq!(run.field("backend"), "/local/domain/0/backend/virtio/0/0");
}

#[test]
fn the_guest_reads_the_backend_directory_and_writes_only_its_own() {
    let host = Host::start();
    let run = host.ok(&["attach", "--domain", "guest1", "--type", "rng"]);
    let (bdir, fdir) = (run.field("backend"), run.field("frontend"));
    let (_bridge, guest) = host.xsd.guest_client(5);

    // Reads of the backend directory, as the frontend driver does them.
    assert_eq!(
        guest.read(N, &format!("{bdir}/type")).unwrap(),
        b"virtio,device4"
    );
    assert_eq!(guest.read(N, &format!("{bdir}/state")).unwrap(), b"1");
    assert_eq!(
        guest.directory(N, "/local/domain/5/device/virtio").unwrap(),
        ["0"]
    );
    // Its own state, and new keys under its own directory.
    guest.write(N, &format!("{fdir}/state"), b"3").unwrap();
    guest.write(N, &format!("{fdir}/num-queues"), b"1").unwrap();
    assert_eq!(host.read(&format!("{fdir}/state")), "3");
    assert_eq!(
        host.dom0
            .get_perms(N, &format!("{fdir}/num-queues"))
            .unwrap(),
        perms(5, 0),
        "a key the guest adds stays readable by the backend"
    );
    // Nothing of the backend's, and no devices of its own making.
    for path in [
        format!("{bdir}/state"),
        format!("{bdir}/online"),
        format!("{bdir}/device-features"),
        "/local/domain/5/device/virtio/9/state".to_owned(),
    ] {
        let e = guest.write(N, &path, b"4").unwrap_err();
        assert!(e.is_eacces(), "{path}: {e}");
    }
    assert!(guest.rm(N, &bdir).unwrap_err().is_eacces());
    assert_eq!(host.read(&format!("{bdir}/state")), "1");

    // Another guest sees neither directory.
    let (_bridge6, other) = host.xsd.guest_client(6);
    for path in [format!("{bdir}/type"), format!("{fdir}/state")] {
        let e = other.read(N, &path).unwrap_err();
        assert!(e.is_eacces(), "{path}: {e}");
    }
}

#[test]
fn a_driver_domain_backend_writes_its_directory_and_reads_the_guests() {
    let host = Host::start();
    let run = host.ok(&[
        "attach",
        "--domain",
        "guest1",
        "--type",
        "blk",
        "--image",
        "/dev/vg0/guest1",
        "--backend-domain",
        "storage",
    ]);
    let (bdir, fdir) = (run.field("backend"), run.field("frontend"));
    assert_eq!(bdir, "/local/domain/7/backend/virtio/5/0");
    assert_eq!(host.dom0.get_perms(N, &bdir).unwrap(), perms(7, 5));
    assert_eq!(host.dom0.get_perms(N, &fdir).unwrap(), perms(5, 7));
    assert_eq!(
        host.tree(&bdir)["params"].0,
        "/dev/vg0/guest1",
        "not checked here"
    );

    let (_b7, storage) = host.xsd.guest_client(7);
    let (_b5, guest) = host.xsd.guest_client(5);
    // The backend publishes, the guest answers, each in its own directory.
    storage
        .write(N, &format!("{bdir}/max-queues"), b"4")
        .unwrap();
    storage.write(N, &format!("{bdir}/state"), b"2").unwrap();
    assert_eq!(guest.read(N, &format!("{bdir}/max-queues")).unwrap(), b"4");
    guest.write(N, &format!("{fdir}/state"), b"3").unwrap();
    assert_eq!(storage.read(N, &format!("{fdir}/state")).unwrap(), b"3");
    assert!(
        storage
            .write(N, &format!("{fdir}/state"), b"6")
            .unwrap_err()
            .is_eacces()
    );
    assert!(
        guest
            .write(N, &format!("{bdir}/state"), b"6")
            .unwrap_err()
            .is_eacces()
    );
}

#[test]
fn concurrent_attaches_get_distinct_devids_from_the_real_daemon() {
    let host = Host::start();
    let children: Vec<_> = (0..6)
        .map(|_| {
            host.command(&["attach", "--quiet", "--domain", "guest1", "--type", "rng"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut devids: Vec<u32> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    devids.sort_unstable();
    assert_eq!(devids, [0, 1, 2, 3, 4, 5]);
    assert_eq!(
        host.dom0
            .directory(N, "/local/domain/5/device/virtio")
            .unwrap()
            .len(),
        6
    );
}

#[test]
fn help_explains_every_subcommand_and_option() {
    let host = Host::start();
    let top = host.ok(&["--help"]).stdout;
    for word in [
        "attach",
        "detach",
        "list",
        "--xenstore",
        "RUST_LOG",
        "Examples",
    ] {
        assert!(top.contains(word), "--help lacks {word}:\n{top}");
    }
    let cases: [(&str, &[&str]); 3] = [
        (
            "attach",
            &[
                "--domain",
                "--type",
                "--image",
                "--readonly",
                "--devid",
                "--queues",
                "--dma",
                "--console",
                "--backend-domain",
                "--quiet",
                "blk",
                "console",
                "rng",
                "grant",
                "bounce",
                "direct",
                "Examples",
            ],
        ),
        (
            "detach",
            &[
                "--domain",
                "--devid",
                "--timeout",
                "--force",
                "--backend-domain",
                "Closed",
            ],
        ),
        (
            "list",
            &["--domain", "--json", "--backend-domain", "Examples"],
        ),
    ];
    for (sub, words) in cases {
        let help = host.ok(&[sub, "--help"]).stdout;
        for word in words {
            assert!(help.contains(word), "{sub} --help lacks {word}:\n{help}");
        }
    }
}
