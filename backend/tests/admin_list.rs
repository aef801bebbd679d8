//! `xenvirtio-backend list` against Debian's real xenstored.
#![allow(clippy::unwrap_used)]

mod admin_support;

use admin_support::{Host, N, s};
use xenvirtio_xenstore::XenStore;

#[test]
fn an_empty_list_is_a_header() {
    let host = Host::start();
    let out = host.ok(&["list"]);
    assert_eq!(out.stdout.lines().count(), 1, "{out}");
    assert!(out.stdout.starts_with("DOMAIN"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&host.ok(&["list", "--json"]).stdout).unwrap();
    assert_eq!(json, serde_json::json!([]));
}

#[test]
fn list_shows_what_attach_created_with_states_and_names() {
    let host = Host::start();
    let image = host.image("g2.img");
    host.ok(&["attach", "--domain", "guest1", "--type", "console"]);
    host.ok(&[
        "attach", "--domain", "guest1", "--type", "rng", "--dma", "grant",
    ]);
    host.ok(&[
        "attach",
        "--domain",
        "guest2",
        "--type",
        "blk",
        "--image",
        s(&image),
        "--readonly",
    ]);
    // A device of another backend domain is not ours to list.
    host.ok(&[
        "attach",
        "--domain",
        "guest2",
        "--type",
        "rng",
        "--backend-domain",
        "storage",
    ]);
    // The backend connects the console; the guest gets there and says which DMA it uses.
    host.dom0
        .write(N, "/local/domain/0/backend/virtio/5/0/state", b"4")
        .unwrap();
    host.dom0
        .write(N, "/local/domain/0/backend/virtio/5/0/tty", b"/dev/pts/3")
        .unwrap();
    let (_bridge, guest) = host.xsd.guest_client(5);
    guest
        .write(N, "/local/domain/5/device/virtio/0/state", b"4")
        .unwrap();
    guest
        .write(N, "/local/domain/5/device/virtio/0/dma", b"bounce")
        .unwrap();
    guest
        .write(
            N,
            "/local/domain/5/device/virtio/1/error",
            b"no \x1b]0;pwned\x07 grants",
        )
        .unwrap();

    let out = host.ok(&["list"]);
    let lines: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0],
        [
            "DOMAIN",
            "DEVID",
            "TYPE",
            "BACKEND",
            "FRONTEND",
            "DMA",
            "IMAGE/CONSOLE",
            "ERROR"
        ]
    );
    assert_eq!(
        lines[1],
        [
            "5",
            "(guest1)",
            "0",
            "console",
            "Connected",
            "Connected",
            "bounce",
            "pty",
            "/dev/pts/3"
        ]
    );
    assert_eq!(
        &lines[2][..7],
        [
            "5",
            "(guest1)",
            "1",
            "rng",
            "Initialising",
            "Initialising",
            "(grant)"
        ]
    );
    assert!(
        out.stdout
            .contains("frontend: no \\u{1b}]0;pwned\\u{7} grants"),
        "guest text is escaped: {out}"
    );
    assert!(!out.stdout.contains('\u{1b}'), "{out}");
    assert_eq!(
        lines[3],
        [
            "6",
            "(guest2)",
            "0",
            "blk",
            "Initialising",
            "Initialising",
            "-",
            s(&image),
            "(ro)"
        ]
    );

    // Filtered by name, and as JSON.
    let out = host.ok(&["list", "--domain", "guest2", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let devices = json.as_array().unwrap();
    assert_eq!(devices.len(), 1, "{out}");
    let d = &devices[0];
    assert_eq!(d["frontend"], 6);
    assert_eq!(d["frontend_name"], "guest2");
    assert_eq!(d["devid"], 0);
    assert_eq!(d["type"], "blk");
    assert_eq!(d["backend_state"], "Initialising");
    assert_eq!(d["image"], s(&image));
    assert_eq!(d["mode"], "r");
    assert_eq!(d["online"], true);
    assert_eq!(d["backend_dir"], "/local/domain/0/backend/virtio/6/0");

    // The driver domain's own list.
    let out = host.ok(&["list", "--backend-domain", "storage", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    // devids are per guest: guest2 has device 0 from Dom0 already.
    assert_eq!(json[0]["backend_dir"], "/local/domain/7/backend/virtio/6/1");

    host.run(&["list", "--domain", "nosuch"])
        .refused_with("no domain is named \"nosuch\"");
}
