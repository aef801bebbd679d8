//! Finding 2 of issue 13: the work one request, and one guest's queue, can make the backend do
//! is bounded. A hostile frontend (bounce strategy, so descriptors may alias each other and
//! each may be the whole pool) against the daemon over the loopback platform; every figure is
//! measured and printed in the assertion message. `docs/RELIABILITY.md` records them.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use xenvirtio_backend::daemon::DaemonConfig;
use xenvirtio_backend::test_utils::{TestDevice, TestFrontend, TestStrategy};
use xenvirtio_virtio::blk::{ReqHeader, S_IOERR, S_OK, T_IN, T_OUT};
use xenvirtio_xen::DomId;
use xenvirtio_xen::loopback::LoopbackDomain;
use xenvirtio_xenstore::xenbus::XenbusState;

const F: DomId = 5;
const G: DomId = 6;
/// The queue size the daemon offers in these tests: blk's `seg_max` is 62, so the largest
/// request is 62 × 64 KiB of data plus 17 bytes.
const QSIZE: u32 = 64;
const CAP_DATA: u32 = 62 * 65536;
/// 2 MiB of bounce pool (the loopback platform grants a domain at most about 1024 pages).
const POOL_PAGES: usize = 512;
/// The console transmit cap (`CONSOLE_TX_MAX`).
const CONSOLE_TX_MAX: u64 = 64 * 1024;

fn config() -> DaemonConfig {
    config_with(QSIZE)
}

fn config_with(max_queue_size: u32) -> DaemonConfig {
    DaemonConfig {
        max_queue_size,
        ..Default::default()
    }
}

fn header(req_type: u32, sector: u64) -> Vec<u8> {
    ReqHeader {
        req_type,
        reserved: 0,
        sector,
    }
    .to_bytes()
    .to_vec()
}

/// A sparse image of zeros.
fn zero_image(w: &World, name: &str, bytes: u64) -> std::path::PathBuf {
    let path = w.dir.path().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    path
}

fn bounce_options() -> xenvirtio_backend::test_utils::FrontendOptions {
    let mut o = options(TestStrategy::Bounce);
    o.arena_pages = POOL_PAGES;
    o.queue_size = QSIZE;
    o
}

/// The header, then a page of non-zero bytes, at the start of the pool.
fn prefix(req_type: u32) -> Vec<u8> {
    let mut p = header(req_type, 0);
    p.extend((0..4096u32).map(|i| (i % 251) as u8 + 1));
    p
}

#[test]
fn hostile_blk_request_over_size_max() {
    let w = World::with_config(config());
    let img = zero_image(&w, "big.img", 16 << 20);
    w.attach(F, 0, &TestDevice::blk(&img));
    let mut fe = w.connect(F, 0, bounce_options());
    let pool = fe.bounce_pool_bytes() as u64;
    // A write of three aliased 2 MiB descriptors (6 MiB, over the 3.9 MiB cap), status at the
    // pool's last byte.
    let mut segs = vec![(0, 16, false)];
    segs.extend((0..3).map(|_| (0, pool as u32, false)));
    segs.push((pool - 1, 1, true));
    let t = Instant::now();
    fe.offer_bounce_chain(0, &prefix(T_OUT), &segs, None)
        .unwrap();
    let (_, used) = fe.wait_raw_used(0, Duration::from_secs(30)).unwrap();
    let took = t.elapsed();
    let status = fe.bounce_pool_read(pool as usize - 1, 1)[0];
    assert_eq!(
        (status, used),
        (S_IOERR, 1),
        "an oversized write is answered IOERR (status {status}, used {used})"
    );
    let image = std::fs::read(&img).unwrap();
    let touched = image.iter().filter(|&&b| b != 0).count();
    assert_eq!(
        touched, 0,
        "the image is untouched ({touched} bytes changed)"
    );
    let s = w.stats_when(F, 0, |s| s.requests >= 1);
    assert_eq!(
        (s.bytes_written, s.bytes_read, s.oversized),
        (0, 0, 1),
        "nothing moved, one refusal counted: {s:?}"
    );
    assert!(
        took < Duration::from_millis(200),
        "the refusal took {took:?}"
    );
    // The device still serves.
    assert_eq!(fe.blk_read(0, 0, 4096).unwrap(), vec![0u8; 4096]);
    // A request exactly at the cap is served.
    let mut at_cap = vec![(0, 16, false)];
    at_cap.push((4096, CAP_DATA / 2, true));
    at_cap.push((4096, CAP_DATA / 2, true));
    at_cap.push((pool - 1, 1, true));
    fe.offer_bounce_chain(0, &prefix(T_IN), &at_cap, None)
        .unwrap();
    let (_, used) = fe.wait_raw_used(0, Duration::from_secs(30)).unwrap();
    assert_eq!(
        (fe.bounce_pool_read(pool as usize - 1, 1)[0], used),
        (S_OK, CAP_DATA + 1),
        "a request at the cap is served"
    );
    eprintln!("hostile_blk_request_over_size_max: refused in {took:?}, 0 bytes moved");
}

#[test]
fn hostile_console_tx_aliased_descriptors() {
    let w = World::with_config(config());
    w.attach(F, 0, &TestDevice::console());
    let mut fe = w.connect(F, 0, bounce_options());
    let pool = fe.bounce_pool_bytes() as u32;
    // 63 descriptors, each the whole pool: 126 MiB of readable bytes.
    let segs: Vec<(u64, u32, bool)> = (0..63).map(|_| (0, pool, false)).collect();
    let t = Instant::now();
    fe.offer_bounce_chain(1, &prefix(T_OUT), &segs, None)
        .unwrap();
    fe.wait_raw_used(1, Duration::from_secs(60)).unwrap();
    let took = t.elapsed();
    let s = w.stats_when(F, 0, |s| s.requests >= 1);
    assert!(
        s.bytes_written <= CONSOLE_TX_MAX && s.oversized == 1,
        "63 aliased {pool}-byte descriptors moved {} bytes (cap {CONSOLE_TX_MAX}), {} refusals",
        s.bytes_written,
        s.oversized
    );
    assert!(
        took < Duration::from_millis(100),
        "63 aliased {pool}-byte descriptors took {took:?}"
    );
    // The device still relays.
    fe.console_write(b"ok").unwrap();
    eprintln!(
        "hostile_console_tx_aliased_descriptors: {took:?}, {} bytes",
        s.bytes_written
    );
}

/// Guest F keeps its ring full of the costliest requests it can make (at the cap, and far over
/// it); guest G reads and verifies meanwhile; then F dies. F's device must be forgotten within
/// 500 ms, and G's reads stay correct and bounded.
#[test]
fn hostile_over_cap_flood_spares_other_guest() {
    // A ring of 256 (blk's cap: 254 × 64 KiB of data).
    const QSIZE: u32 = 256;
    const CAP_DATA: u32 = 254 * 65536;
    let w = World::with_config(config_with(QSIZE));
    let img = zero_image(&w, "flood.img", 512 << 20);
    let img_g = w.image("g.img", 256);
    w.attach(F, 0, &TestDevice::blk(&img));
    w.attach(G, 0, &TestDevice::blk(&img_g));
    let mut opts = bounce_options().indirect();
    opts.queue_size = QSIZE;
    let mut fe = w.connect(F, 0, opts);
    let mut good = w.connect(G, 0, options(TestStrategy::GrantPerRequest));
    let pool = fe.bounce_pool_bytes() as u64;
    // Each ring descriptor is an indirect table, in a 256 KiB area near the pool's end that no
    // data descriptor covers (one 1 KiB slot per request in flight; the device completes in
    // order). At the cap: 18 descriptors. Over it: 62 aliased descriptors of almost the whole
    // pool (about 107 MiB).
    let tables = pool - (264 << 10);
    let mut slot = 0u64;
    let mut table_at = || {
        slot += 1;
        Some(tables + (slot % u64::from(QSIZE)) * 1024)
    };
    let mut at_cap = vec![(0, 16, false)];
    at_cap.extend((0..16).map(|_| (4096, CAP_DATA / 16, true)));
    at_cap.push((pool - 1, 1, true));
    let mut over = vec![(0, 16, false)];
    over.extend((0..62).map(|_| (4096, (tables - 4096) as u32, true)));
    over.push((pool - 1, 1, true));
    let p = prefix(T_IN);
    let mut heads = std::collections::BTreeMap::new();
    for i in 0..QSIZE {
        let big = i % 8 != 0;
        let h = fe
            .offer_bounce_chain(0, &p, if big { &over } else { &at_cap }, table_at())
            .unwrap();
        heads.insert(h, big);
    }
    let mut worst = Duration::ZERO;
    let mut reads = 0u32;
    let mut flooded = 0u32;
    let flood_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < flood_until {
        // Refill F's ring with what came back (at most a ring's worth per round).
        for _ in 0..heads.len() {
            let Ok((head, _)) = fe.wait_raw_used(0, Duration::from_millis(1)) else {
                break;
            };
            let big = heads.remove(&head).unwrap_or(false);
            flooded += 1;
            let h = fe
                .offer_bounce_chain(0, &p, if big { &over } else { &at_cap }, table_at())
                .unwrap();
            heads.insert(h, big);
        }
        let sector = u64::from(reads % 248);
        let t = Instant::now();
        let got = good.blk_read(0, sector, 4096).unwrap();
        worst = worst.max(t.elapsed());
        assert_eq!(
            got,
            read_file_range(&img_g, sector * 512, 4096),
            "G read {reads}"
        );
        reads += 1;
    }
    assert_eq!(
        fe.backend_state(),
        Some(XenbusState::Connected),
        "F's device is still serving its flood ({flooded} completions): {:?}",
        fe.backend_error()
    );
    // F dies with its ring full.
    let t = Instant::now();
    w.hv.destroy(F);
    w.xs.destroy_domain(F);
    let mut gone = None;
    while t.elapsed() < Duration::from_secs(60) {
        if w.handle().stats().devices.iter().all(|d| d.domid != F) {
            gone = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let gone = gone.expect("F's device is never forgotten");
    assert!(
        gone < Duration::from_millis(500),
        "a flooded device handled DomainGone after {gone:?} (bound 500 ms)"
    );
    assert!(
        worst < Duration::from_millis(500) && reads >= 10,
        "G served {reads} verified reads during the flood, the slowest in {worst:?}"
    );
    assert_eq!(w.live_maps_of(F), 0, "nothing of F stays mapped");
    drop(fe);
    assert_eq!(w.backend_state(G, 0), Some(XenbusState::Connected));
    good.close().unwrap();
    eprintln!(
        "hostile_over_cap_flood_spares_other_guest: {flooded} flood completions, gone after {gone:?}; G: {reads} reads, worst {worst:?}"
    );
}

/// Only legal requests: the daemon's default queue size (1024, so blk's cap is 1022 × 64 KiB,
/// about 64 MiB), a ring of 1024 reads each exactly at the cap (one shared indirect table,
/// 1022 aliased 64 KiB descriptors), kept full for a second. Returns the frontend, the reads
/// in the ring and the reads served.
fn flood_at_cap(w: &World) -> (TestFrontend<LoopbackDomain>, u32, u32) {
    const QSIZE: u32 = 1024;
    let img = zero_image(w, "legal.img", 128 << 20);
    w.attach(F, 0, &TestDevice::blk(&img));
    let mut opts = bounce_options().indirect();
    opts.queue_size = QSIZE;
    let mut fe = w.connect(F, 0, opts);
    let pool = fe.bounce_pool_bytes() as u64;
    let table = Some(pool - (32 << 10));
    let mut at_cap = vec![(0, 16, false)];
    at_cap.extend((0..QSIZE - 2).map(|_| (4096, 65536, true)));
    at_cap.push((pool - 1, 1, true));
    let p = prefix(T_IN);
    let mut offered = 0u32;
    while fe.offer_bounce_chain(0, &p, &at_cap, table).is_ok() {
        offered += 1;
        if offered == QSIZE {
            break;
        }
    }
    let mut served = 0u32;
    let flood_until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < flood_until {
        if fe.wait_raw_used(0, Duration::from_millis(5)).is_ok() {
            served += 1;
            fe.offer_bounce_chain(0, &p, &at_cap, table).unwrap();
        }
    }
    assert!(served > 0, "no read at the cap was served");
    assert_eq!(
        fe.backend_state(),
        Some(XenbusState::Connected),
        "F's device is still serving ({served} reads at the cap): {:?}",
        fe.backend_error()
    );
    (fe, offered, served)
}

/// The byte and time budgets, not the per-request cap, must bring the thread back to its
/// inbox: F's death is handled within 500 ms.
#[test]
fn hostile_at_cap_flood_does_not_delay_domain_gone() {
    let w = World::with_config(config_with(1024));
    let (fe, offered, served) = flood_at_cap(&w);
    let t = Instant::now();
    w.hv.destroy(F);
    w.xs.destroy_domain(F);
    let mut gone = None;
    while t.elapsed() < Duration::from_secs(120) {
        if w.handle().stats().devices.iter().all(|d| d.domid != F) {
            gone = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let gone = gone.expect("F's device is never forgotten");
    assert!(
        gone < Duration::from_millis(500),
        "a device flooded with {offered} reads of 64 MiB handled DomainGone after {gone:?} \
         (bound 500 ms; {served} served)"
    );
    drop(fe);
    eprintln!(
        "hostile_at_cap_flood_does_not_delay_domain_gone: {offered} in the ring, {served} served, gone after {gone:?}"
    );
}

/// The same flood, then the daemon stops: it completes within its 500 ms grace (the flooding
/// frontend never answers the Closing) plus 250 ms.
#[test]
fn hostile_queue_flood_does_not_delay_shutdown() {
    let mut w = World::with_config(config_with(1024));
    let grace = w.config.shutdown_grace;
    let (fe, offered, served) = flood_at_cap(&w);
    let t = Instant::now();
    w.stop_daemon();
    let took = t.elapsed();
    assert!(
        took < grace + Duration::from_millis(250),
        "a stop with {offered} reads of 64 MiB in the ring took {took:?} (grace {grace:?}; \
         {served} served)"
    );
    drop(fe);
    eprintln!("hostile_queue_flood_does_not_delay_shutdown: stop took {took:?} (grace {grace:?})");
}
