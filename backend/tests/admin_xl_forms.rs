//! The xl-like command line of `xenvirtio-backend` against Debian's real xenstored: positional
//! forms beside the flags, vdev names, one exit code for refusals, and help that fits 80
//! columns (issue 16, item 8).
#![allow(clippy::unwrap_used)]

mod admin_support;

use admin_support::{Host, s};

#[test]
fn attach_and_detach_take_xl_positional_forms_and_vdev_names() {
    let host = Host::start();
    let a = host.image("a.img");
    let b = host.image("b.img");
    // xl block-attach's order: DOMAIN IMAGE [VDEV]; the type is blk.
    let first = host.ok(&["attach", "guest1", s(&a)]);
    assert_eq!(first.field("devid"), "0");
    assert_eq!(first.field("vdev"), "xvda");
    let second = host.ok(&["attach", "guest1", s(&b), "xvdc"]);
    assert_eq!(second.field("devid"), "2");
    assert_eq!(second.field("vdev"), "xvdc");
    assert_eq!(
        host.read("/local/domain/0/backend/virtio/5/2/params"),
        s(&b)
    );
    // --devid takes a vdev too, and vd names mean the same device.
    let rng = host.ok(&["attach", "guest1", "--type", "rng", "--devid", "vdd"]);
    assert_eq!(rng.field("devid"), "3");
    // The flags still work; both forms of one thing at once are refused.
    host.run(&["attach", "guest1", "--domain", "guest2", "--type", "rng"])
        .refused_with("cannot be used with");
    host.run(&["attach", "guest1", "--type", "rng", "--devid", "xvd1"])
        .refused_with("\"xvd1\" is not a device: give a devid (0, 1, ...) or a vdev name");
    host.run(&["attach", "guest1"])
        .refused_with("give the device type (--type blk|console|rng|net), or an image");
    // detach DOMAIN DEVID|VDEV, as `xl block-detach guest1 xvdc`.
    let out = host.ok(&["detach", "guest1", "xvdc", "--timeout", "0.2", "--force"]);
    assert!(
        out.stdout.contains("detached virtio device 2 of domain 5"),
        "{out}"
    );
    host.ok(&["detach", "guest1", "0", "--timeout", "0.2", "--force"]);
    host.ok(&[
        "detach",
        "--domain",
        "guest1",
        "--devid",
        "vdd",
        "--timeout",
        "0.2",
        "--force",
    ]);
    assert!(!host.exists("/local/domain/0/backend/virtio/5/0"));
    assert!(!host.exists("/local/domain/0/backend/virtio/5/2"));
    assert!(!host.exists("/local/domain/0/backend/virtio/5/3"));
    host.run(&["detach", "guest1"]).refused_with("DEVID|VDEV");
}

#[test]
fn list_takes_a_domain_positionally_and_refuses_one_that_does_not_exist() {
    let host = Host::start();
    host.ok(&["attach", "guest1", "--type", "rng"]);
    let all = host.ok(&["list", "guest1"]);
    assert_eq!(all.stdout.lines().count(), 2, "{all}");
    // A live guest without devices: an empty list, not an error.
    let none = host.ok(&["list", "--domain", "guest2"]);
    assert_eq!(none.stdout.lines().count(), 1, "only the header: {none}");
    // A domid nobody has, with no device here: an error, exit 2.
    host.run(&["list", "--domain", "42"])
        .refused_with("domain 42 does not exist");
    host.run(&["list", "42"])
        .refused_with("domain 42 does not exist");
}

#[test]
fn help_fits_80_columns_and_examples_are_whole_commands() {
    xenvirtio_tests::help::check_help_fits(
        env!("CARGO_BIN_EXE_xenvirtio-backend"),
        &["attach", "detach", "list", "serve", "stats"],
        &["xenvirtio-backend"],
    );
}

#[test]
fn attach_remembers_devices_by_domain_name_and_detach_forgets_them() {
    let host = Host::start();
    let image = host.image("a.img");
    let book = host.dir.path().join("state/domains/guest1.json");
    host.ok(&["attach", "guest1", s(&image), "xvdb"]);
    host.ok(&["attach", "guest1", "--type", "rng"]);
    host.ok(&["attach", "guest1", "--type", "rng", "--transient"]);
    let text = std::fs::read_to_string(&book).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(
        devices.len(),
        2,
        "the transient device is not remembered: {text}"
    );
    assert_eq!(devices[0]["devid"], 0);
    assert_eq!(devices[0]["type"], "rng");
    assert_eq!(devices[1]["devid"], 1);
    assert_eq!(devices[1]["image"], s(&image));
    // A detach forgets; a failed one (no such device) changes nothing.
    host.ok(&["detach", "guest1", "xvdb", "--timeout", "0.2", "--force"]);
    host.run(&["detach", "guest1", "7"]).refused_with("7");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&book).unwrap()).unwrap();
    assert_eq!(v["devices"].as_array().unwrap().len(), 1);
    host.ok(&["detach", "guest1", "0", "--timeout", "0.2", "--force"]);
    assert!(!book.exists(), "an empty book is removed");
}

#[test]
fn logs_can_be_json_lines_with_the_fields_as_keys() {
    let host = Host::start();
    let out = host
        .command(&["--log-format", "json", "attach", "guest1", "--type", "rng"])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let attached = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "virtio device attached")
        .unwrap_or_else(|| panic!("no JSON line for the attach: {stderr}"));
    assert_eq!(attached["level"], "DEBUG");
    assert_eq!(attached["fields"]["domid"], 5);
    assert_eq!(attached["fields"]["devid"], 0);
    assert!(
        stderr.lines().all(|l| l.starts_with('{')),
        "every line is JSON: {stderr}"
    );
}
