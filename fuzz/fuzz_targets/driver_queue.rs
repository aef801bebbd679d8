//! libFuzzer target `driver_queue`: see `xenvirtio_fuzz::driver_queue` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::driver_queue::{DriverInput, run};

fuzz_target!(|input: DriverInput| run(&input));
