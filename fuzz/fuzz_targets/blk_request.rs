//! libFuzzer target `blk_request`: see `xenvirtio_fuzz::blk_request` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::blk_request::{BlkInput, run};

fuzz_target!(|input: BlkInput| run(&input));
