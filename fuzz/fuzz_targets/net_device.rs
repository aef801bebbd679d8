//! libFuzzer target `net_device`: see `xenvirtio_fuzz::net_device` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::net_device::{NetInput, run};

fuzz_target!(|input: NetInput| run(&input));
