//! libFuzzer target `handshake`: see `xenvirtio_fuzz::handshake` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::handshake::{HandshakeInput, run};

fuzz_target!(|input: HandshakeInput| run(&input));
