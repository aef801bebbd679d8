//! libFuzzer target `nbd_server`: see `xenvirtio_fuzz::nbd_server` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::nbd_server::{NbdInput, run};

fuzz_target!(|input: NbdInput| run(&input));
