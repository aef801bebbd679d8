//! `XsClient::open()`: `$XENSTORED_PATH` first, then the default sockets and
//! `/dev/xen/xenbus`, and an error naming every path tried. This binary holds one test because
//! it changes the process environment.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use xenvirtio_tests::xenstored::Xenstored;
use xenvirtio_xenstore::{
    DEFAULT_SOCKET_PATHS, TxId, XENBUS_DEVICE, XENSTORED_PATH_ENV, XenStore, XsClient, XsError,
};

fn set_env(value: &Path) {
    // SAFETY: this test binary runs a single test, and nothing else in the process reads or
    // writes the environment while it runs.
    unsafe { std::env::set_var(XENSTORED_PATH_ENV, value) };
}

#[test]
fn open_follows_xenstored_path_then_lists_every_path_tried() {
    let xsd = Xenstored::start();
    set_env(xsd.socket());
    let c = XsClient::open().unwrap();
    assert!(
        c.description()
            .contains(&xsd.socket().display().to_string()),
        "{}",
        c.description()
    );
    c.write(TxId::NONE, "/opened", b"1").unwrap();
    assert_eq!(c.read(TxId::NONE, "/opened").unwrap(), b"1");

    let missing = xsd.dir().join("no-such-socket");
    set_env(&missing);
    let defaults_absent = DEFAULT_SOCKET_PATHS
        .iter()
        .chain([&XENBUS_DEVICE])
        .all(|p| !Path::new(p).exists());
    match XsClient::open() {
        Err(XsError::TransportNotFound { tried }) => {
            let paths: Vec<&str> = tried.iter().map(|(p, _)| p.as_str()).collect();
            let mut expected = vec![missing.to_str().unwrap()];
            expected.extend(DEFAULT_SOCKET_PATHS);
            expected.push(XENBUS_DEVICE);
            assert_eq!(paths, expected);
            let msg = XsError::TransportNotFound { tried }.to_string();
            for p in expected {
                assert!(msg.contains(p), "{msg}");
            }
        }
        Ok(c) => assert!(
            !defaults_absent,
            "opened {} although nothing should exist",
            c.description()
        ),
        Err(e) => panic!("unexpected error: {e}"),
    }
}
