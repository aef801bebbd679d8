//! libFuzzer target `device_queue`: see `xenvirtio_fuzz::device_queue` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::device_queue::{QueueInput, run};

fuzz_target!(|input: QueueInput| run(&input));
