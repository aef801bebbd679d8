//! libFuzzer target `dma_map`: see `xenvirtio_fuzz::dma_map` for the input and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xenvirtio_fuzz::dma_map::{DmaInput, run};

fuzz_target!(|input: DmaInput| run(&input));
