//! The fuzz harnesses of xenvirtio (test tier 4 of docs/DESIGN.md: fuzzing and hostile peers).
//!
//! Every target feeds code that parses what a hostile peer controls with structured input
//! ([`input`]) and checks invariants beyond "does not crash": the rules of
//! `docs/PROTOCOL.md`, independent models, round trips, determinism. The harness of each
//! target is a module here with `run(&Input)` (panics on a violation) and `seeds()` (the
//! unit tests' cases as inputs). The same code serves three drivers:
//! - the libFuzzer targets in `fuzz_targets/` (`scripts/fuzz.sh`, `cargo fuzz run`);
//! - `examples/write_seeds.rs`, which writes the seed corpora;
//! - `tests/replay.rs`, which replays the seeds and every saved crash on the stable toolchain
//!   without libFuzzer.
//!
//! What must never happen here: a harness that accepts everything. Each check names the rule
//! it enforces, so a failure reads as a finding.

pub mod blk_request;
pub mod daemon_blk;
pub mod device_queue;
pub mod dma_map;
pub mod driver_queue;
pub mod handshake;
pub mod input;
pub mod nbd_server;
pub mod net_device;
pub mod wire_codecs;
pub mod xenstore_client;

use input::Structured;

/// The targets, as `fuzz_targets/<name>.rs` names them.
pub const TARGETS: [&str; 10] = [
    "device_queue",
    "blk_request",
    "dma_map",
    "driver_queue",
    "xenstore_client",
    "wire_codecs",
    "nbd_server",
    "handshake",
    "daemon_blk",
    "net_device",
];

/// A temp dir for a harness's image: tmpfs when there is one, so FLUSH costs nothing.
pub(crate) fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temp dir")
}

/// A copy of everything a window holds.
pub(crate) fn snapshot(mem: &xenvirtio_xen::mem::SharedMem<'_>) -> Vec<u8> {
    let mut v = vec![0u8; mem.len()];
    mem.read(0, &mut v).expect("the whole window is readable");
    v
}

/// Runs target `name` on raw fuzzer bytes, exactly as its libFuzzer target does.
pub fn run_bytes(name: &str, data: &[u8]) {
    match name {
        "device_queue" => device_queue::run(&Structured::from_bytes(data)),
        "blk_request" => blk_request::run(&Structured::from_bytes(data)),
        "dma_map" => dma_map::run(&Structured::from_bytes(data)),
        "driver_queue" => driver_queue::run(&Structured::from_bytes(data)),
        "xenstore_client" => xenstore_client::run(&Structured::from_bytes(data)),
        "wire_codecs" => wire_codecs::run(&Structured::from_bytes(data)),
        "nbd_server" => nbd_server::run(&Structured::from_bytes(data)),
        "handshake" => handshake::run(&Structured::from_bytes(data)),
        "daemon_blk" => daemon_blk::run(&Structured::from_bytes(data)),
        "net_device" => net_device::run(&Structured::from_bytes(data)),
        other => panic!("no fuzz target named {other:?}"),
    }
}

/// The structure fuzzer bytes read as, for reports.
pub fn describe(name: &str, data: &[u8]) -> String {
    match name {
        "device_queue" => format!("{:?}", device_queue::QueueInput::from_bytes(data)),
        "blk_request" => format!("{:?}", blk_request::BlkInput::from_bytes(data)),
        "dma_map" => format!("{:?}", dma_map::DmaInput::from_bytes(data)),
        "driver_queue" => format!("{:?}", driver_queue::DriverInput::from_bytes(data)),
        "xenstore_client" => format!("{:?}", xenstore_client::XsInput::from_bytes(data)),
        "wire_codecs" => format!("{:?}", wire_codecs::CodecInput::from_bytes(data)),
        "nbd_server" => format!("{:?}", nbd_server::NbdInput::from_bytes(data)),
        "handshake" => format!("{:?}", handshake::HandshakeInput::from_bytes(data)),
        "daemon_blk" => format!("{:?}", daemon_blk::DaemonInput::from_bytes(data)),
        "net_device" => format!("{:?}", net_device::NetInput::from_bytes(data)),
        other => panic!("no fuzz target named {other:?}"),
    }
}

fn encode<T: Structured + PartialEq + std::fmt::Debug>(
    seeds: Vec<(&'static str, T)>,
) -> Vec<(&'static str, Vec<u8>)> {
    seeds
        .into_iter()
        .map(|(name, input)| {
            let bytes = input.to_bytes();
            // The seed must read back as the structure it was written from.
            assert_eq!(
                T::from_bytes(&bytes),
                input,
                "seed {name} does not round-trip"
            );
            (name, bytes)
        })
        .collect()
}

/// The seed corpus of target `name`: its unit tests' cases, as fuzzer bytes.
pub fn seeds(name: &str) -> Vec<(&'static str, Vec<u8>)> {
    match name {
        "device_queue" => encode(device_queue::seeds()),
        "blk_request" => encode(blk_request::seeds()),
        "dma_map" => encode(dma_map::seeds()),
        "driver_queue" => encode(driver_queue::seeds()),
        "xenstore_client" => encode(xenstore_client::seeds()),
        "wire_codecs" => encode(wire_codecs::seeds()),
        "nbd_server" => encode(nbd_server::seeds()),
        "handshake" => encode(handshake::seeds()),
        "daemon_blk" => encode(daemon_blk::seeds()),
        "net_device" => encode(net_device::seeds()),
        other => panic!("no fuzz target named {other:?}"),
    }
}
