use super::*;
use crate::admin::DomainRef;
use std::collections::BTreeMap;
use std::sync::Arc;
use xenvirtio_xenstore::{MemConnection, MemStore};

const N: TxId = TxId::NONE;

struct World {
    daemon: MemStore,
    dom0: MemConnection,
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let daemon = MemStore::new();
        let dom0 = daemon.connect(0).unwrap();
        dom0.write(N, "/local/domain/0/domid", b"0").unwrap();
        dom0.write(N, "/local/domain/0/name", b"Domain-0").unwrap();
        for (domid, name) in [(5, "guest1"), (6, "guest2"), (7, "driver")] {
            daemon.start_guest(domid).unwrap();
            dom0.write(N, &format!("/local/domain/{domid}/name"), name.as_bytes())
                .unwrap();
        }
        // Has a home, but the hypervisor never started it.
        daemon.create_domain(8);
        dom0.mkdir(N, "/local/domain/8").unwrap();
        World {
            daemon,
            dom0,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn image(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        path
    }

    /// Every node under `dir` with its value and permissions.
    fn tree(&self, dir: &str) -> BTreeMap<String, (String, Vec<Perm>)> {
        let mut out = BTreeMap::new();
        for child in self.dom0.directory(N, dir).unwrap() {
            let path = format!("{dir}/{child}");
            let value = String::from_utf8(self.dom0.read(N, &path).unwrap()).unwrap();
            out.insert(child, (value, self.dom0.get_perms(N, &path).unwrap()));
        }
        out
    }
}

fn expect(keys: &[(&str, &str)], perms: &[Perm]) -> BTreeMap<String, (String, Vec<Perm>)> {
    keys.iter()
        .map(|(k, v)| ((*k).to_owned(), ((*v).to_owned(), perms.to_vec())))
        .collect()
}

#[test]
fn blk_writes_every_toolstack_key_with_the_protocol_permissions() {
    let w = World::new();
    let image = w.image("disk.img");
    let mut req = AttachRequest::blk(5, &image);
    req.queues = Some(4);
    req.dma = DmaSetting::Pinned(DmaStrategy::Bounce);
    let out = attach(&w.dom0, &req).unwrap();
    assert_eq!(out.devid, 0);
    assert_eq!(out.backend_dir, "/local/domain/0/backend/virtio/5/0");
    assert_eq!(out.frontend_dir, "/local/domain/5/device/virtio/0");
    let be_perms = [Perm::owner(0), Perm::read(5)];
    let fe_perms = [Perm::owner(5), Perm::read(0)];
    assert_eq!(w.dom0.get_perms(N, &out.backend_dir).unwrap(), be_perms);
    assert_eq!(w.dom0.get_perms(N, &out.frontend_dir).unwrap(), fe_perms);
    let image = image.to_str().unwrap();
    assert_eq!(
        w.tree(&out.backend_dir),
        expect(
            &[
                ("frontend", "/local/domain/5/device/virtio/0"),
                ("frontend-id", "5"),
                ("online", "1"),
                ("state", "1"),
                ("type", "virtio,device2"),
                ("transport", "xenbus"),
                ("grant_usage", "0"),
                ("dma", "bounce"),
                ("params", image),
                ("mode", "w"),
                ("requested-queues", "4"),
            ],
            &be_perms
        )
    );
    assert_eq!(
        w.tree(&out.frontend_dir),
        expect(
            &[
                ("backend", "/local/domain/0/backend/virtio/5/0"),
                ("backend-id", "0"),
                ("state", "1"),
            ],
            &fe_perms
        )
    );
    // The guest may list its devices but not create any.
    for p in ["/local/domain/5/device", "/local/domain/5/device/virtio"] {
        assert_eq!(
            w.dom0.get_perms(N, p).unwrap(),
            [Perm::owner(0), Perm::read(5)]
        );
    }
}

#[test]
fn console_and_rng_write_their_own_keys_and_devids_count_up() {
    let w = World::new();
    let sock = w.dir.path().join("console.sock");
    let mut req = AttachRequest::new(DomainRef::Name("guest1".into()), DeviceKind::Console);
    req.console = Some(ConsoleOutput::Socket(sock.clone()));
    let console = attach(&w.dom0, &req).unwrap();
    let rng = attach(&w.dom0, &AttachRequest::new(5, DeviceKind::Rng)).unwrap();
    let pty = attach(&w.dom0, &AttachRequest::new(5, DeviceKind::Console)).unwrap();
    assert_eq!((console.devid, rng.devid, pty.devid), (0, 1, 2));
    assert_eq!(console.frontend, 5, "the name resolved");
    let be = w.tree(&console.backend_dir);
    assert_eq!(be["type"].0, "virtio,device3");
    assert_eq!(be["console"].0, format!("socket:{}", sock.display()));
    assert!(!be.contains_key("params") && !be.contains_key("requested-queues"));
    assert_eq!(w.tree(&pty.backend_dir)["console"].0, "pty");
    let be = w.tree(&rng.backend_dir);
    assert_eq!(be["type"].0, "virtio,device4");
    assert_eq!(be["dma"].0, "auto");
    assert_eq!(
        be.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "dma",
            "frontend",
            "frontend-id",
            "grant_usage",
            "online",
            "state",
            "transport",
            "type"
        ]
    );
}

#[test]
fn a_given_devid_is_used_and_refused_when_taken_by_either_directory() {
    let w = World::new();
    let mut req = AttachRequest::new(5, DeviceKind::Rng);
    req.devid = Some(3);
    assert_eq!(attach(&w.dom0, &req).unwrap().devid, 3);
    let e = attach(&w.dom0, &req).unwrap_err();
    assert!(
        matches!(&e, AdminError::DevidInUse { devid: 3, path, .. }
            if path == "/local/domain/5/device/virtio/3"),
        "{e}"
    );
    // A stale backend directory alone also holds the devid.
    w.dom0
        .write(N, "/local/domain/0/backend/virtio/5/4/state", b"6")
        .unwrap();
    req.devid = Some(4);
    let e = attach(&w.dom0, &req).unwrap_err();
    assert!(
        e.to_string()
            .contains("/local/domain/0/backend/virtio/5/4 exists"),
        "{e}"
    );
    // The smallest free one skips both.
    req.devid = None;
    let ids: Vec<u32> = (0..4)
        .map(|_| attach(&w.dom0, &req).unwrap().devid)
        .collect();
    assert_eq!(ids, [0, 1, 2, 5]);
}

#[test]
fn same_domain_at_both_ends_collapses_the_permissions() {
    let w = World::new();
    let out = attach(&w.dom0, &AttachRequest::new(0, DeviceKind::Rng)).unwrap();
    assert_eq!(out.backend_dir, "/local/domain/0/backend/virtio/0/0");
    for dir in [&out.backend_dir, &out.frontend_dir] {
        assert_eq!(w.dom0.get_perms(N, dir).unwrap(), [Perm::owner(0)]);
    }
}

#[test]
fn a_driver_domain_backend_owns_its_directory_and_checks_no_local_files() {
    let w = World::new();
    let mut req = AttachRequest::blk(5, "/dev/mapper/vg-guest1");
    req.backend = Some(DomainRef::Name("driver".into()));
    req.readonly = true;
    let out = attach(&w.dom0, &req).unwrap();
    assert_eq!(out.backend_dir, "/local/domain/7/backend/virtio/5/0");
    assert_eq!(
        w.dom0.get_perms(N, &out.backend_dir).unwrap(),
        [Perm::owner(7), Perm::read(5)]
    );
    assert_eq!(
        w.dom0.get_perms(N, &out.frontend_dir).unwrap(),
        [Perm::owner(5), Perm::read(7)]
    );
    let be = w.tree(&out.backend_dir);
    assert_eq!(be["params"].0, "/dev/mapper/vg-guest1");
    assert_eq!(be["mode"].0, "r");
    assert_eq!(be["grant_usage"].0, "1");
    // The driver domain can write its backend state, the guest its frontend state.
    let driver = w.daemon.connect(7).unwrap();
    driver
        .write(N, &format!("{}/state", out.backend_dir), b"2")
        .unwrap();
    let guest = w.daemon.connect(5).unwrap();
    guest
        .write(N, &format!("{}/state", out.frontend_dir), b"3")
        .unwrap();
    assert!(
        guest
            .write(N, &format!("{}/state", out.backend_dir), b"6")
            .unwrap_err()
            .is_eacces()
    );
    // A relative path cannot name a file in another domain.
    req.image = Some("disk.img".into());
    let e = attach(&w.dom0, &req).unwrap_err();
    assert!(matches!(e, AdminError::PathNotAbsolute { .. }), "{e}");
}

#[test]
fn grant_usage_is_libxls_default_and_direct_needs_dom0() {
    let w = World::new();
    let mut req = AttachRequest::new(5, DeviceKind::Rng);
    for dma in ["auto", "grant", "bounce", "direct"] {
        req.dma = dma.parse().unwrap();
        let out = attach(&w.dom0, &req).unwrap();
        let be = w.tree(&out.backend_dir);
        assert_eq!(
            (be["dma"].0.as_str(), be["grant_usage"].0.as_str()),
            (dma, "0"),
            "a Dom0 backend"
        );
    }
    req.backend = Some(DomainRef::Id(7));
    for dma in ["auto", "grant", "bounce"] {
        req.dma = dma.parse().unwrap();
        let out = attach(&w.dom0, &req).unwrap();
        assert_eq!(
            w.tree(&out.backend_dir)["grant_usage"].0,
            "1",
            "a driver domain"
        );
    }
    req.dma = DmaSetting::Pinned(DmaStrategy::Direct);
    let e = attach(&w.dom0, &req).unwrap_err();
    assert!(
        matches!(e, AdminError::DirectNeedsDom0 { backend: 7 }),
        "{e}"
    );
    assert!(e.to_string().contains("--dma direct"), "{e}");
}

#[test]
fn bad_requests_are_refused_before_anything_is_written() {
    let w = World::new();
    let image = w.image("disk.img");
    let sock_dir_missing = w.dir.path().join("nodir/console.sock");
    let empty = w.dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    let odd = w.dir.path().join("odd.img");
    std::fs::File::create(&odd)
        .unwrap()
        .set_len(1_000_000)
        .unwrap();
    let cases: Vec<(AttachRequest, &str)> = vec![
        (AttachRequest::new(5, DeviceKind::Block), "needs an image"),
        (AttachRequest::blk(5, &empty), "is 0 bytes: an empty image"),
        (
            AttachRequest::blk(5, &odd),
            "is 1000000 bytes: not a whole number of 512-byte sectors: its last 64 bytes",
        ),
        (
            AttachRequest::blk(5, w.dir.path().join("absent.img")),
            "absent.img does not exist",
        ),
        (AttachRequest::blk(5, w.dir.path()), "is a directory"),
        (
            AttachRequest::blk(5, "/dev/null"),
            "/dev/null is a character device",
        ),
        (AttachRequest::blk(42, &image), "domain 42 does not exist"),
        (
            AttachRequest::new(8, DeviceKind::Rng),
            "domain 8 is not running",
        ),
        (
            AttachRequest {
                backend: Some(DomainRef::Id(8)),
                ..AttachRequest::new(5, DeviceKind::Rng)
            },
            "domain 8 is not running",
        ),
        (
            AttachRequest::blk(DomainRef::Name("nobody".into()), &image),
            "no domain is named \"nobody\"",
        ),
        (
            AttachRequest {
                backend: Some(DomainRef::Id(9)),
                ..AttachRequest::blk(5, &image)
            },
            "domain 9 does not exist",
        ),
        (
            AttachRequest {
                image: Some(image.clone()),
                ..AttachRequest::new(5, DeviceKind::Rng)
            },
            "--image is only for blk devices, not for rng",
        ),
        (
            AttachRequest {
                readonly: true,
                ..AttachRequest::new(5, DeviceKind::Console)
            },
            "--readonly is only for blk devices, not for console",
        ),
        (
            AttachRequest {
                console: Some(ConsoleOutput::Pty),
                ..AttachRequest::blk(5, &image)
            },
            "--console is only for console devices, not for blk",
        ),
        (
            AttachRequest {
                queues: Some(0),
                ..AttachRequest::blk(5, &image)
            },
            "blk devices take 1 to 16 queues, not 0",
        ),
        (
            AttachRequest {
                queues: Some(17),
                ..AttachRequest::blk(5, &image)
            },
            "not 17",
        ),
        (
            AttachRequest {
                queues: Some(1),
                ..AttachRequest::new(5, DeviceKind::Console)
            },
            "console devices take exactly 2 queues, not 1",
        ),
        (
            AttachRequest {
                queues: Some(2),
                ..AttachRequest::new(5, DeviceKind::Rng)
            },
            "rng devices take exactly 1 queues, not 2",
        ),
        (
            AttachRequest {
                console: Some(ConsoleOutput::Socket(sock_dir_missing)),
                ..AttachRequest::new(5, DeviceKind::Console)
            },
            "nodir of console socket",
        ),
        (
            AttachRequest {
                console: Some(ConsoleOutput::Socket(w.dir.path().join("s".repeat(120)))),
                ..AttachRequest::new(5, DeviceKind::Console)
            },
            "over the 107 bytes",
        ),
    ];
    for (req, needle) in cases {
        let e = attach(&w.dom0, &req).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(needle), "{req:?}: {msg:?} lacks {needle:?}");
        assert!(!msg.contains('\n'), "one line: {msg:?}");
    }
    assert!(
        !w.dom0.exists(N, "/local/domain/5/device").unwrap(),
        "nothing was written"
    );
    assert!(!w.dom0.exists(N, "/local/domain/0/backend").unwrap());
}

#[test]
fn an_image_has_one_writer_or_only_readers_unless_force_shared() {
    let w = World::new();
    let image = w.image("shared.img");
    let link = w.dir.path().join("link.img");
    std::os::unix::fs::symlink(&image, &link).unwrap();
    let ro = |d: DomId, p: &Path| AttachRequest {
        readonly: true,
        ..AttachRequest::blk(d, p)
    };
    // Two readers share it; a writer beside them is refused, by any path to the file.
    attach(&w.dom0, &ro(5, &image)).unwrap();
    attach(&w.dom0, &ro(6, &link)).unwrap();
    let e = attach(&w.dom0, &AttachRequest::blk(6, &link)).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            AdminError::ImageAttached {
                frontend: 5,
                devid: 0,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("already attached read-only to domain 5 (guest1) as device 0")
            && msg.contains("attaching it read-write too")
            && msg.contains("--force-share"),
        "{msg}"
    );
    // A writer holds it: neither a reader nor a second writer gets it.
    let other = w.image("other.img");
    attach(&w.dom0, &AttachRequest::blk(5, &other)).unwrap();
    for req in [AttachRequest::blk(6, &other), ro(6, &other)] {
        let msg = attach(&w.dom0, &req).unwrap_err().to_string();
        assert!(
            msg.contains("already attached read-write to domain 5 (guest1)"),
            "{msg}"
        );
    }
    // The operator who means it.
    let forced = AttachRequest {
        force_share: true,
        ..AttachRequest::blk(6, &other)
    };
    let out = attach(&w.dom0, &forced).unwrap();
    let key = format!("{}/force-share", out.backend_dir);
    assert_eq!(w.dom0.read_string(N, &key).unwrap(), "1");
    // A force-shared device does not stop others either.
    let third = w.image("third.img");
    attach(
        &w.dom0,
        &AttachRequest {
            force_share: true,
            ..AttachRequest::blk(5, &third)
        },
    )
    .unwrap();
    attach(&w.dom0, &AttachRequest::blk(6, &third)).unwrap();
    // Not for other types.
    let bad = AttachRequest {
        force_share: true,
        ..AttachRequest::new(5, DeviceKind::Rng)
    };
    assert!(
        attach(&w.dom0, &bad)
            .unwrap_err()
            .to_string()
            .contains("--force-share")
    );
}

#[test]
fn an_image_another_process_locked_is_refused_with_that_process() {
    let w = World::new();
    let image = w.image("held.img");
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(&image)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io (qemu-utils) is needed");
    let file = std::fs::File::open(&image).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while crate::image_lock::probe(&file, &image, crate::image_lock::LockMode::Exclusive).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-io never locked it"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let e = attach(&w.dom0, &AttachRequest::blk(5, &image)).unwrap_err();
    let forced = attach(
        &w.dom0,
        &AttachRequest {
            force_share: true,
            ..AttachRequest::blk(5, &image)
        },
    );
    let _ = holder.kill();
    let _ = holder.wait();
    let msg = e.to_string();
    assert!(matches!(e, AdminError::ImageLocked(_)), "{msg}");
    assert!(
        msg.contains(&format!("process {} (qemu-io)", holder.id())),
        "{msg}"
    );
    forced.unwrap();
}

#[test]
fn an_image_that_cannot_be_written_needs_readonly() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    // A regular file we may read but not write: mode 0444 stops anyone but root; root
    // is stopped by sysfs, whose read-only attributes refuse writers whatever the mode.
    let image = w.image("ro.img");
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o444)).unwrap();
    let image = if OpenOptions::new().write(true).open(&image).is_ok() {
        PathBuf::from("/sys/kernel/notes")
    } else {
        image
    };
    assert!(
        image.is_file() && OpenOptions::new().write(true).open(&image).is_err(),
        "no regular file that cannot be opened for writing: {}",
        image.display()
    );
    let e = attach(&w.dom0, &AttachRequest::blk(5, &image)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("{} cannot be opened for writing", image.display()))
            && msg.contains("--readonly"),
        "{msg}"
    );
    let mut req = AttachRequest::blk(5, &image);
    req.readonly = true;
    // As root the unwritable file is a sysfs one, whose size need not be whole sectors
    // (refused for that reason); the read-only attach is then shown with our own file.
    let sectors = std::fs::metadata(&image).is_ok_and(|m| m.len() > 0 && m.len() % 512 == 0);
    if !sectors {
        req.image = Some(w.image("ro-whole-sectors.img"));
    }
    let out = attach(&w.dom0, &req).unwrap();
    assert_eq!(w.tree(&out.backend_dir)["mode"].0, "r");
}

#[test]
fn relative_paths_are_stored_absolute() {
    let w = World::new();
    let image = std::fs::canonicalize(w.image("rel.img")).unwrap();
    // A path relative to the test's working directory, through "..", whatever that is.
    let cwd = std::env::current_dir().unwrap();
    let ups: PathBuf = cwd.components().skip(1).map(|_| "..").collect();
    let rel = ups.join(image.strip_prefix("/").unwrap());
    assert!(rel.is_relative());
    let out = attach(&w.dom0, &AttachRequest::blk(5, &rel)).unwrap();
    assert_eq!(
        w.tree(&out.backend_dir)["params"].0,
        image.to_str().unwrap()
    );

    let sock = ups
        .join(w.dir.path().strip_prefix("/").unwrap())
        .join("c.sock");
    let mut req = AttachRequest::new(5, DeviceKind::Console);
    req.console = Some(ConsoleOutput::Socket(sock));
    let out = attach(&w.dom0, &req).unwrap();
    let dir = std::fs::canonicalize(w.dir.path()).unwrap();
    assert_eq!(
        w.tree(&out.backend_dir)["console"].0,
        format!("socket:{}", dir.join("c.sock").display())
    );
}

#[test]
fn concurrent_attaches_get_distinct_devids() {
    let w = World::new();
    let conns: Vec<Arc<MemConnection>> = (0..4)
        .map(|_| Arc::new(w.daemon.connect(0).unwrap()))
        .collect();
    let threads: Vec<_> = conns
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| {
                        attach(&*c, &AttachRequest::new(5, DeviceKind::Rng))
                            .unwrap()
                            .devid
                    })
                    .collect::<Vec<u32>>()
            })
        })
        .collect();
    let mut all: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..20).collect::<Vec<u32>>());
}

#[test]
fn settings_parse_and_print() {
    assert_eq!("auto".parse::<DmaSetting>().unwrap(), DmaSetting::Auto);
    for s in DmaStrategy::ALL {
        let parsed: DmaSetting = s.name().parse().unwrap();
        assert_eq!(parsed, DmaSetting::Pinned(s));
        assert_eq!(parsed.to_string(), s.name());
    }
    assert!("fast".parse::<DmaSetting>().is_err());
    assert_eq!("pty".parse::<ConsoleOutput>().unwrap(), ConsoleOutput::Pty);
    let s: ConsoleOutput = "socket:/run/g.sock".parse().unwrap();
    assert_eq!(s, ConsoleOutput::Socket("/run/g.sock".into()));
    assert_eq!(s.to_string(), "socket:/run/g.sock");
    for bad in ["", "socket:", "tty", "file:/x"] {
        let e = bad.parse::<ConsoleOutput>().unwrap_err();
        assert!(
            e.to_string().contains("pty") || e.to_string().contains("path"),
            "{e}"
        );
    }
}

#[test]
fn net_writes_its_keys_and_checks_its_options_first() {
    let w = World::new();
    let sock = w.dir.path().join("switch.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut req = AttachRequest::new(5, DeviceKind::Net);
    req.net.mac = Some("00:16:3e:01:02:03".parse().unwrap());
    req.net.mtu = Some(9000);
    req.net.socket = Some(sock.clone());
    let out = attach(&w.dom0, &req).unwrap();
    let tree = w.tree(&out.backend_dir);
    let value = |k: &str| tree.get(k).map(|(v, _)| v.as_str());
    assert_eq!(value("type"), Some("virtio,device1"));
    assert_eq!(value("mac"), Some("00:16:3e:01:02:03"));
    assert_eq!(value("mtu"), Some("9000"));
    let link = format!("socket:{}", sock.display());
    assert_eq!(value("link"), Some(link.as_str()));
    assert_eq!(value("bridge"), None, "no bridge for a socket");

    // Without a MAC, one under the Xen OUI is drawn; the TAP's bridge must exist here.
    let mut tap = AttachRequest::new(5, DeviceKind::Net);
    tap.net.bridge = Some("no-such-br9".into());
    let e = attach(&w.dom0, &tap).unwrap_err().to_string();
    assert!(
        e.contains("no-such-br9 does not exist in this domain") && e.contains("ip link add"),
        "{e}"
    );
    tap.net.bridge = Some("lo".into());
    let e = attach(&w.dom0, &tap).unwrap_err().to_string();
    assert!(e.contains("lo is not a bridge"), "{e}");
    assert!(random_mac().to_string().starts_with("00:16:3e:"));

    let refused = |f: &dyn Fn(&mut AttachRequest), want: &str| {
        let mut r = AttachRequest::new(5, DeviceKind::Net);
        f(&mut r);
        let e = attach(&w.dom0, &r).unwrap_err().to_string();
        assert!(e.contains(want), "{want:?} not in {e:?}");
    };
    refused(
        &|r| r.net.mac = Some("01:00:5e:00:00:01".parse().unwrap()),
        "a group or empty address",
    );
    refused(&|r| r.net.mtu = Some(67), "--mtu: 67 is outside 68 to 9000");
    refused(
        &|r| r.net.vifname = Some("a/b".into()),
        "is not an interface name",
    );
    refused(
        &|r| {
            r.net.socket = Some(sock.clone());
            r.net.bridge = Some("xenbr0".into());
        },
        "--bridge: is for a TAP",
    );
    refused(
        &|r| r.net.socket = Some(w.dir.path().join("nothing")),
        "is not a listening unix socket",
    );
    refused(&|r| r.queues = Some(1), "exactly 2");
    // Net options on other devices, and other devices' options on net.
    let mut rng = AttachRequest::new(5, DeviceKind::Rng);
    rng.net.mac = Some("00:16:3e:01:02:03".parse().unwrap());
    let e = attach(&w.dom0, &rng).unwrap_err().to_string();
    assert_eq!(e, "--mac is only for net devices, not for rng");
    refused(
        &|r| r.readonly = true,
        "--readonly is only for blk devices, not for net",
    );
    assert_eq!(
        w.dom0
            .directory(N, "/local/domain/0/backend/virtio/5")
            .unwrap(),
        vec!["0".to_owned()],
        "nothing refused was written"
    );
}
