//! libFuzzer target `daemon_blk`: see `xenvirtio_fuzz::daemon_blk` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::daemon_blk::{DaemonInput, run};

fuzz_target!(|input: DaemonInput| run(&input));
