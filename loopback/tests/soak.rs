//! The short soak in CI: 8 guests' devices at depth 64, the strategies in turn, every read
//! verified against the model and every image compared with it at the end, and the process's
//! resident memory flat once the devices are connected. `xenvirtio-loopback soak --minutes N`
//! is the long one (docs/RELIABILITY.md).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use xenvirtio_loopback::soak::{self, SoakConfig};

/// Growth of the resident memory allowed after the soak settled: allocator noise and the
/// loopback hypervisor's bounded map records, not a leak (a leak of one buffer per request
/// would be hundreds of MiB in this time).
const RSS_GROWTH_KIB: u64 = 64 * 1024;

#[test]
fn eight_devices_at_depth_64_verify_every_byte_with_flat_memory() {
    let config = SoakConfig {
        duration: Duration::from_secs(15),
        ..SoakConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let pair = soak::start_pair(&config).unwrap();
    let report = soak::run(&pair, dir.path(), &config, &|line| eprintln!("{line}")).unwrap();
    print!("{}", report.render());
    assert_eq!(report.devices.len(), 8);
    assert_eq!(report.mismatches(), 0, "{}", report.render());
    for d in &report.devices {
        // Every device did real work, and the final read-back covered the whole image.
        assert!(d.writes > 500 && d.reads > 2048, "{d:?}");
    }
    let (settled, peak) = report.rss_settled_and_peak().unwrap();
    assert!(
        peak <= settled + RSS_GROWTH_KIB,
        "resident memory grew from {settled} KiB to {peak} KiB"
    );
    drop(pair);
}
