//! Issue 13, finding 3: a frontend domain with many bounce devices cannot map more than its
//! page budget (`--max-pages-per-domain`, default 1024), and another domain still connects and
//! is served. The daemon runs in-process over the loopback platform with its default config
//! (the loopback's grant table is enlarged so that the guest can grant more than the budget).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use xenvirtio_backend::test_utils::{TestDevice, TestStrategy};
use xenvirtio_xen::loopback::LoopbackDomain;

/// The hostile domain and a well-behaved one.
const HOSTILE: u16 = 5;
const OTHER: u16 = 6;
/// The daemon's default budget (`DEFAULT_MAX_PAGES_PER_DOMAIN`).
const BUDGET: usize = 1024;
/// Pool pages per hostile device: four such pools (1200 pages) are more than the budget.
const POOL: usize = 300;

#[test]
fn hostile_many_bounce_devices_of_one_domain_hit_the_domain_budget() {
    let w = World::with_loopback(
        xenvirtio_backend::daemon::DaemonConfig::default(),
        xenvirtio_xen::loopback::LoopbackConfig {
            max_grants: 4096,
            ..Default::default()
        },
    );
    let mapped = |dom: u16| w.hv.stats(dom).pages_mapped_by_peers;
    let mut connected: Vec<xenvirtio_backend::test_utils::TestFrontend<LoopbackDomain>> =
        Vec::new();
    let mut refused = Vec::new();
    let mut most = 0;
    for devid in 0..4u32 {
        w.attach(HOSTILE, devid, &TestDevice::rng());
        let mut opts = options(TestStrategy::Bounce);
        opts.arena_pages = POOL;
        opts.timeout = std::time::Duration::from_secs(3);
        match xenvirtio_backend::test_utils::TestFrontend::connect(
            w.hv.domain(HOSTILE),
            w.guest(HOSTILE),
            0,
            devid,
            opts,
        ) {
            Ok(fe) => connected.push(fe),
            Err(e) => refused.push((devid, chain(&e))),
        }
        most = most.max(mapped(HOSTILE));
    }
    assert!(
        most <= BUDGET,
        "the hostile domain's devices have {most} of its pages mapped, over the budget of \
         {BUDGET} ({} devices of {POOL} pool pages connected)",
        connected.len()
    );
    assert_eq!(
        connected.len(),
        3,
        "three pools fit in the budget: {refused:?}"
    );
    // The frontend sees the error node before the device thread publishes its statistics.
    let error = w
        .stats_when(HOSTILE, 3, |s| s.last_error.is_some())
        .last_error
        .unwrap_or_default();
    assert!(
        error.contains("budget"),
        "the fourth device's error names the budget: {error:?}"
    );
    // The connected devices still serve.
    for fe in &mut connected {
        assert_eq!(fe.rng_read(64).unwrap().len(), 64);
    }
    // Another domain connects and is served verified data.
    let image = w.image("other.img", 64);
    w.attach(OTHER, 0, &TestDevice::blk(&image));
    let mut fe = w.connect(OTHER, 0, options(TestStrategy::Bounce));
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    fe.blk_write(0, 2, &data).unwrap();
    assert_eq!(fe.blk_read(0, 2, data.len()).unwrap(), data);
    assert_eq!(read_file_range(&image, 2 * 512, data.len()), data);
    let st = w.handle().stats();
    let hostile = st.domains.iter().find(|d| d.domid == HOSTILE).unwrap();
    assert_eq!(hostile.budget, BUDGET as u64);
    assert_eq!(hostile.mapped_pages, mapped(HOSTILE) as u64);
    println!(
        "hostile domain: {} of {BUDGET} pages mapped at most; refused: {refused:?}",
        most
    );
    fe.close().unwrap();
    for fe in connected {
        fe.close().unwrap();
    }
}
