//! libFuzzer target `wire_codecs`: see `xenvirtio_fuzz::wire_codecs` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::wire_codecs::{CodecInput, run};

fuzz_target!(|input: CodecInput| run(&input));
