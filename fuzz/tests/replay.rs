//! Replays every seed, and every input saved under `fuzz/regressions/<target>/`, through the
//! harnesses on the stable toolchain, without libFuzzer: the fuzzers' checks run in a plain
//! `cargo test`, and a crash once found stays covered here as well as by the named
//! `test_regression_*` test in the crate where it was fixed.

use std::path::Path;

fn replay(target: &str) {
    for (name, bytes) in xenvirtio_fuzz::seeds(target) {
        eprintln!("{target}: seed {name}");
        xenvirtio_fuzz::run_bytes(target, &bytes);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut paths: Vec<_> = entries
        .map(|e| e.expect("a directory entry").path())
        .collect();
    paths.sort();
    for path in paths {
        eprintln!("{target}: regression {}", path.display());
        let bytes = std::fs::read(&path).expect("a saved input");
        xenvirtio_fuzz::run_bytes(target, &bytes);
    }
}

#[test]
fn device_queue() {
    replay("device_queue");
}

#[test]
fn blk_request() {
    replay("blk_request");
}

#[test]
fn dma_map() {
    replay("dma_map");
}

#[test]
fn driver_queue() {
    replay("driver_queue");
}

#[test]
fn xenstore_client() {
    replay("xenstore_client");
}

#[test]
fn wire_codecs() {
    replay("wire_codecs");
}

#[test]
fn nbd_server() {
    replay("nbd_server");
}

#[test]
fn handshake() {
    replay("handshake");
}

#[test]
fn daemon_blk() {
    replay("daemon_blk");
}

#[test]
fn net_device() {
    replay("net_device");
}
