//! Bad arguments to `xenvirtio-backend attach` (and a missing xenstore): a non-zero exit, one
//! line on stderr naming the problem, and nothing written.
#![allow(clippy::unwrap_used)]

mod admin_support;

use admin_support::{Host, N, s};
use std::path::Path;

use xenvirtio_xenstore::XenStore;

#[test]
fn bad_attach_arguments_are_refused_by_name_and_write_nothing() {
    let host = Host::start();
    let image = host.image("ok.img");
    let image = s(&image);
    let missing = host.dir.path().join("missing.img");
    let nodir = host.dir.path().join("nodir/hvc.sock");
    let console_nodir = format!("socket:{}", nodir.display());
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec![
                "--domain",
                "guest1",
                "--type",
                "blk",
                "--image",
                s(&missing),
            ],
            format!("image {} does not exist", missing.display()),
        ),
        (
            vec!["--domain", "guest1", "--type", "blk"],
            "a blk device needs an image: give --image PATH".into(),
        ),
        (
            vec![
                "--domain",
                "guest1",
                "--type",
                "blk",
                "--image",
                s(host.dir.path()),
            ],
            "is a directory, not a regular file or a block device".into(),
        ),
        (
            vec!["--domain", "42", "--type", "rng"],
            "domain 42 does not exist (there is no /local/domain/42 in xenstore)".into(),
        ),
        (
            vec!["--domain", "nosuch", "--type", "rng"],
            "no domain is named \"nosuch\"".into(),
        ),
        (
            vec![
                "--domain",
                "guest1",
                "--type",
                "rng",
                "--backend-domain",
                "9",
            ],
            "domain 9 does not exist".into(),
        ),
        (
            vec![
                "--domain",
                "guest1",
                "--type",
                "rng",
                "--dma",
                "direct",
                "--backend-domain",
                "storage",
            ],
            "--dma direct needs the backend in Dom0, and backend domain 7 is not Dom0".into(),
        ),
        (
            vec!["--domain", "guest1", "--type", "rng", "--image", image],
            "--image is only for blk devices, not for rng".into(),
        ),
        (
            vec!["--domain", "guest1", "--type", "console", "--readonly"],
            "--readonly is only for blk devices, not for console".into(),
        ),
        (
            vec![
                "--domain", "guest1", "--type", "blk", "--image", image, "--queues", "0",
            ],
            "blk devices take 1 to 16 queues, not 0".into(),
        ),
        (
            vec![
                "--domain", "guest1", "--type", "blk", "--image", image, "--queues", "17",
            ],
            "blk devices take 1 to 16 queues, not 17".into(),
        ),
        (
            vec!["--domain", "guest1", "--type", "console", "--queues", "4"],
            "console devices take exactly 2 queues, not 4".into(),
        ),
        (
            vec!["--domain", "guest1", "--type", "rng", "--queues", "2"],
            "rng devices take exactly 1 queues, not 2".into(),
        ),
        (
            vec![
                "--domain",
                "guest1",
                "--type",
                "console",
                "--console",
                "serial",
            ],
            "console \"serial\" is not valid: write pty or socket:<path>".into(),
        ),
        (
            vec![
                "--domain",
                "guest1",
                "--type",
                "console",
                "--console",
                &console_nodir,
            ],
            format!(
                "the directory {} of console socket",
                nodir.parent().unwrap().display()
            ),
        ),
        (
            vec!["--domain", "guest1", "--type", "floppy"],
            "invalid value 'floppy' for '--type <TYPE>'".into(),
        ),
        (
            vec!["--domain", "guest1", "--type", "rng", "--dma", "fast"],
            "invalid value 'fast' for '--dma <STRATEGY>'".into(),
        ),
        (
            vec!["--domain", "99999", "--type", "rng"],
            "\"99999\" is not a domain: domids go from 0 to 32751".into(),
        ),
    ];
    for (args, needle) in &cases {
        let mut full = vec!["attach"];
        full.extend(args);
        let run = host.run(&full);
        run.refused_with(needle);
        // Our own refusals are one line; clap's usage errors add a usage block.
        if !run.stderr.contains("Usage:") && !run.stderr.contains("try '--help'") {
            assert_eq!(run.stderr.lines().count(), 1, "one line: {run}");
            assert!(run.stderr.starts_with("error: "), "{run}");
        }
    }
    assert!(
        !host.exists("/local/domain/5/device"),
        "nothing was written"
    );
    assert!(!host.exists("/local/domain/0/backend"));
    assert!(!host.exists("/local/domain/7/backend"));
}

#[test]
fn a_domain_with_a_home_but_no_life_is_refused() {
    let host = Host::start();
    // A leftover home: xenstored has never been introduced to domain 9.
    host.dom0
        .write(N, "/local/domain/9/name", b"ghost")
        .unwrap();
    host.run(&["attach", "--domain", "ghost", "--type", "rng"])
        .refused_with("domain 9 is not running");
    host.run(&[
        "attach",
        "--domain",
        "guest1",
        "--type",
        "rng",
        "--backend-domain",
        "9",
    ])
    .refused_with("domain 9 is not running");
    assert!(!host.exists("/local/domain/9/device"));
}

#[test]
fn a_devid_in_use_is_refused() {
    let host = Host::start();
    host.ok(&[
        "attach", "--domain", "guest1", "--type", "rng", "--devid", "2",
    ]);
    let before = host.tree("/local/domain/0/backend/virtio/5/2");
    host.run(&[
        "attach", "--domain", "guest1", "--type", "console", "--devid", "2",
    ])
    .refused_with("devid 2 of domain 5 is already in use: /local/domain/5/device/virtio/2 exists");
    assert_eq!(
        host.tree("/local/domain/0/backend/virtio/5/2"),
        before,
        "untouched"
    );
    assert_eq!(
        host.dom0
            .directory(N, "/local/domain/5/device/virtio")
            .unwrap(),
        ["2"]
    );
}

#[test]
fn an_unreachable_xenstore_is_named() {
    let host = Host::start();
    let socket = host.dir.path().join("no-such-socket");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_xenvirtio-backend"))
        .args(["--xenstore", s(&socket), "list"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert!(
        stderr.contains(&format!("cannot reach xenstore at {}", socket.display())),
        "{stderr}"
    );
}

#[test]
fn a_host_without_its_domid_key_is_refused_unless_the_backend_is_named() {
    let host = Host::start();
    host.ok(&["attach", "--domain", "guest1", "--type", "rng"]);
    host.dom0.rm(N, "/local/domain/0/domid").unwrap();
    host.run(&["attach", "--domain", "guest1", "--type", "rng"])
        .refused_with("cannot tell which domain this is: reading its domid key");
    host.run(&["list"])
        .refused_with("cannot tell which domain this is");
    // list and detach need it only to default --backend-domain.
    let out = host.ok(&["list", "--backend-domain", "0"]);
    assert_eq!(out.stdout.lines().count(), 2, "{out}");
}

#[test]
fn serve_without_the_xen_devices_fails_at_start_and_publishes_nothing() {
    assert!(
        !Path::new("/dev/xen/gntdev").exists(),
        "this test needs a host without Xen (it has /dev/xen/gntdev)"
    );
    let host = Host::start();
    let image = host.image("disk.img");
    host.ok(&[
        "attach",
        "--domain",
        "guest1",
        "--type",
        "blk",
        "--image",
        s(&image),
    ]);
    let control = host.dir.path().join("control.sock");
    let started = std::time::Instant::now();
    let run = host.run(&["serve", "--socket", s(&control)]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "serve took {:?} to give up",
        started.elapsed()
    );
    assert_eq!(run.code, Some(2), "{run}");
    assert!(
        run.stderr
            .contains("cannot serve as domain 0: the Xen devices it needs cannot be opened")
            && run.stderr.contains("/dev/xen/gntdev")
            && run.stderr.contains("xen-gntdev"),
        "{run}"
    );
    // Nothing was published: the device still waits for a backend.
    assert_eq!(host.read("/local/domain/0/backend/virtio/5/0/state"), "1");
    assert!(!control.exists(), "no control socket was left");
}
