//! libFuzzer target `xenstore_client`: see `xenvirtio_fuzz::xenstore_client` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::xenstore_client::{XsInput, run};

fuzz_target!(|input: XsInput| run(&input));
