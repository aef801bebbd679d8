//! The blocking API when callers' data is larger than the DMA memory it is bounced through:
//! a large call, and several calls at once, must complete rather than wait for memory that
//! only they hold (found pairing the frontend with the real backend: a 1 MiB NBD write with the
//! default 256 pages of DMA memory waited for its own staging buffers until its timeout).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use xenvirtio_frontend::Frontend;
use xenvirtio_frontend::blk::BlkOptions;
use xenvirtio_virtio::dma::DmaStrategy;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn options(strategy: DmaStrategy, dma_pages: usize) -> BlkOptions {
    let mut o = BlkOptions::default();
    o.connect.dma = Some(strategy);
    o.connect.dma_pages = dma_pages;
    o.connect.num_queues = Some(1);
    o.connect.timeout = Duration::from_secs(5);
    // Long enough for any honest wait on this machine, short enough to fail a deadlock.
    o.io_timeout = Some(Duration::from_secs(20));
    o
}

#[test]
fn a_call_larger_than_the_dma_memory_completes() {
    for strategy in [DmaStrategy::Grant, DmaStrategy::Bounce] {
        let env = Env::new();
        let _backend = Backend::start(&env, Script::blk(0));
        let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
        // 64 pages: 256 KiB of DMA memory for a 3 MiB call.
        let dev = fe.connect_blk(0, &options(strategy, 64)).unwrap();
        let data = pattern(3 << 20, 1);
        dev.write_at(&data, 4096).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 4096).unwrap();
        assert!(back == data, "{strategy}: read back other bytes");
        dev.close().unwrap();
    }
}

#[test]
fn concurrent_calls_share_scarce_dma_memory_without_deadlock() {
    let env = Env::new();
    let _backend = Backend::start(&env, Script::blk(0));
    let fe = Frontend::new(env.guest_platform(), Arc::clone(&env.guest), pvh());
    let dev = fe.connect_blk(0, &options(DmaStrategy::Grant, 64)).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let dev = &dev;
            s.spawn(move || {
                for round in 0..4u8 {
                    let data = pattern(512 << 10, t * 16 + round);
                    let at = u64::from(t) * (1 << 20);
                    dev.write_at(&data, at).unwrap();
                    let mut back = vec![0u8; data.len()];
                    dev.read_at(&mut back, at).unwrap();
                    assert!(back == data, "thread {t} round {round}");
                }
            });
        }
    });
    dev.close().unwrap();
}
