//! The real frontend against the real backend daemon in one process, over the loopback
//! hypervisor: every device over every DMA strategy, blk data checked against the image file
//! on disk, multi-queue concurrency, and the role policy's choices and refusals.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use xenvirtio_backend::admin::{AttachRequest, ConsoleOutput};
use xenvirtio_frontend::blk::BlkOp;
use xenvirtio_frontend::{ConnectError, ConnectOptions};
use xenvirtio_loopback::counters::HypervisorCounts;
use xenvirtio_loopback::role::RoleName;
use xenvirtio_virtio::dma::DmaStrategy;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_xenstore::xenbus::XenbusState;

const F: u16 = 1;
/// A guest the daemon was not told to trust with `direct`.
const UNTRUSTED: u16 = 3;

/// What Dom0 mapped of domain `F` since the records were cleared: (grant maps, of which
/// unmapped, foreign maps, live).
fn mappings(w: &World) -> (usize, usize, usize, usize) {
    let c = HypervisorCounts::read(w.pair.hypervisor(), F);
    (
        c.grant_maps as usize,
        c.grant_unmaps as usize,
        c.foreign_maps as usize,
        c.live as usize,
    )
}

#[test]
fn blk_over_every_strategy_matches_the_image_on_disk() {
    let w = World::new();
    let size = 4 << 20;
    let img = w.image("disk.img", size);
    let mut expected = std::fs::read(&img).unwrap();
    let fe = w.frontend(GUEST);
    for (round, strategy) in STRATEGIES.into_iter().enumerate() {
        w.pair.hypervisor().clear_records();
        let devid = w.attach_blk_again(F, &img, None);
        let dev = w.connect_blk(&fe, devid, strategy);
        assert_eq!(dev.negotiated().strategy, strategy.dma(), "{strategy:?}");
        assert_eq!(dev.negotiated().persistent, strategy.persistent());
        assert_eq!(dev.size(), size as u64);

        // Reads see what is on disk, at any alignment.
        for (offset, len) in [(0, 4096), (511, 1), (12345, 300_000), (size - 700, 700)] {
            let mut buf = vec![0u8; len];
            dev.read_at(&mut buf, offset as u64).unwrap();
            assert!(
                buf == expected[offset..offset + len],
                "{strategy:?}: read of {len} at {offset} differs from the image"
            );
        }
        // Writes of every shape land in the file.
        let seed = round as u8 * 40;
        for (i, (offset, len)) in [
            (0, 512),
            (4095, 1),
            (8192 + 17, 4097),
            (1 << 20, 300_000),
            (size - 65536, 65536),
        ]
        .into_iter()
        .enumerate()
        {
            let d = data(len, seed + i as u8);
            dev.write_at(&d, offset as u64).unwrap();
            expected[offset..offset + len].copy_from_slice(&d);
        }
        dev.flush().unwrap();
        // Zeroing and discard.
        assert!(dev.supports(BlkOp::WriteZeroes { unmap: false }));
        dev.write_zeroes(2 << 20, 70_000, false).unwrap();
        expected[2 << 20..(2 << 20) + 70_000].fill(0);
        assert!(
            std::fs::read(&img).unwrap() == expected,
            "{strategy:?}: the image differs"
        );
        let mut back = vec![0u8; 300_000];
        dev.read_at(&mut back, 1 << 20).unwrap();
        assert!(back == expected[1 << 20..(1 << 20) + 300_000]);

        // What the backend mapped is what the strategy promises.
        eventually("the daemon counts every request", || {
            w.pair
                .device_stats(F, devid)
                .is_some_and(|s| s.requests >= dev.stats().requests)
        });
        let st = w.pair.device_stats(F, devid).unwrap();
        assert_eq!(st.strategy, strategy.dma().name());
        assert_eq!(st.errors, 0);
        let (grants, unmapped, foreign, live) = mappings(&w);
        let requests = dev.stats().requests as usize;
        match strategy {
            Strategy::GrantPerRequest => {
                // One mapping per access of every request, all unmapped again; only the ring
                // stays.
                assert!(grants > requests, "{grants} maps for {requests} requests");
                assert_eq!(unmapped, grants - 1);
                assert_eq!(live, 1);
            }
            Strategy::GrantPersistent => {
                assert_eq!(unmapped, 0, "persistent grants stay mapped");
                assert!(
                    grants <= 1 + dev.stats().dma.pages,
                    "at most one map per page"
                );
                assert!(live > 1);
            }
            Strategy::Bounce => {
                // Directory (mapped, copied, unmapped), pool, ring: whatever the I/O.
                assert_eq!((grants, unmapped, foreign), (3, 1, 0));
            }
            Strategy::Direct => {
                assert_eq!(grants, 0);
                assert!((1..=3).contains(&foreign), "{foreign} foreign maps");
            }
        }
        dev.close().unwrap();
        eventually("the backend holds nothing of the guest", || {
            w.pair.backend_holdings(F).is_nothing()
        });
        let left = w.pair.domain_stats(F);
        assert!(
            left.is_idle(),
            "{strategy:?}: the guest still holds {left:?}"
        );
    }
}

#[test]
fn console_both_directions_over_every_strategy() {
    let w = World::new();
    let fe = w.frontend(GUEST);
    for strategy in STRATEGIES {
        let socket = w.dir.path().join(format!("console-{strategy:?}.sock"));
        let mut req = AttachRequest::new(F, DeviceKind::Console);
        req.console = Some(ConsoleOutput::Socket(socket.clone()));
        let devid = w.pair.attach(&req).unwrap().devid;
        let dev = fe.connect_console(devid, &strategy.connect()).unwrap();
        assert_eq!(dev.negotiated().strategy, strategy.dma());
        let mut host = None;
        eventually("the backend listens on the console socket", || {
            host = UnixStream::connect(&socket).ok();
            host.is_some()
        });
        let mut host = host.unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();

        // Guest to host: more than one chunk.
        let out: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        dev.write(&out).unwrap();
        let mut got = vec![0u8; out.len()];
        host.read_exact(&mut got).unwrap();
        assert!(got == out, "{strategy:?}: the host read other bytes");

        // Host to guest.
        let typed = format!("typed over {strategy:?}\n").into_bytes();
        host.write_all(&typed).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while seen.len() < typed.len() {
            let n = dev
                .rx()
                .lock()
                .unwrap()
                .read(&mut buf, Some(Duration::from_secs(10)))
                .unwrap();
            assert!(n > 0, "{strategy:?}: nothing arrived from the host");
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(seen, typed);
        dev.close().unwrap();
        eventually("the backend holds nothing of the guest", || {
            w.pair.backend_holdings(F).is_nothing()
        });
    }
}

#[test]
fn rng_over_every_strategy() {
    let w = World::new();
    let fe = w.frontend(GUEST);
    for strategy in STRATEGIES {
        let devid = w
            .pair
            .attach(&AttachRequest::new(F, DeviceKind::Rng))
            .unwrap()
            .devid;
        let mut dev = fe.connect_rng(devid, &strategy.connect()).unwrap();
        assert_eq!(dev.negotiated().strategy, strategy.dma());
        let mut a = vec![0u8; 10_000];
        let mut b = vec![0u8; 10_000];
        let t = Some(Duration::from_secs(10));
        assert_eq!(dev.read(&mut a, t).unwrap(), a.len());
        assert_eq!(dev.read(&mut b, t).unwrap(), b.len());
        assert!(a != b, "{strategy:?}: two reads returned the same bytes");
        // Random bytes use every value; zero-filled or stuck buffers would not.
        let distinct = a.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(
            distinct > 200,
            "{strategy:?}: only {distinct} distinct byte values"
        );
        eventually("the daemon counts the entropy", || {
            w.pair
                .device_stats(F, devid)
                .is_some_and(|s| s.bytes_read >= 20_000)
        });
        dev.close().unwrap();
    }
}

#[test]
fn multi_queue_blk_takes_concurrent_io_on_every_queue() {
    let w = World::new();
    let size = 8 << 20;
    let img = w.image("mq.img", size);
    let fe = w.frontend(GUEST);
    for strategy in STRATEGIES {
        let devid = w.attach_blk_again(F, &img, Some(4));
        let mut opts = strategy.blk();
        opts.connect.num_queues = Some(4);
        opts.connect.dma_pages = 512;
        let dev = fe.connect_blk(devid, &opts).unwrap();
        assert_eq!(dev.num_queues(), 4);
        let slice = size / 8;
        std::thread::scope(|s| {
            // Four threads on the blocking API (spread over the queues by the driver) and one
            // zero-copy thread per queue, all at once, on disjoint ranges.
            for t in 0..4 {
                let dev = &dev;
                s.spawn(move || {
                    for i in 0..8 {
                        let at = t * slice + i * (slice / 8);
                        let d = data(slice / 8, (t * 8 + i) as u8);
                        dev.write_at(&d, at as u64).unwrap();
                        let mut back = vec![0u8; d.len()];
                        dev.read_at(&mut back, at as u64).unwrap();
                        assert!(back == d, "thread {t} read back other bytes");
                    }
                });
            }
            for q in 0..4 {
                let dev = &dev;
                s.spawn(move || {
                    let base = (4 + q) * slice;
                    let mut queue = dev.lock_queue(q);
                    let mut ids = Vec::new();
                    for i in 0..16 {
                        let buf = queue.alloc(16384).unwrap();
                        buf.write(0, &data(16384, (q * 16 + i) as u8)).unwrap();
                        let sector = (base + i * 16384) as u64 / 512;
                        ids.push(queue.submit_write(buf, sector).unwrap());
                    }
                    let mut done = 0;
                    while done < ids.len() {
                        for c in queue.wait(Some(Duration::from_secs(20))).unwrap() {
                            assert!(ids.contains(&c.id));
                            c.result.unwrap();
                            done += 1;
                        }
                    }
                });
            }
        });
        dev.flush().unwrap();
        let image = std::fs::read(&img).unwrap();
        for t in 0..4 {
            for i in 0..8 {
                let at = t * slice + i * (slice / 8);
                assert!(image[at..at + slice / 8] == data(slice / 8, (t * 8 + i) as u8));
            }
        }
        for q in 0..4 {
            for i in 0..16 {
                let at = (4 + q) * slice + i * 16384;
                assert!(
                    image[at..at + 16384] == data(16384, (q * 16 + i) as u8),
                    "{strategy:?}: queue {q} request {i} is not in the image"
                );
            }
        }
        let st = w.pair.device_stats(F, devid).unwrap();
        assert_eq!(st.ports, 4, "one event channel per queue");
        assert!(st.notifications_received >= 4);
        dev.close().unwrap();
    }
}

/// Connects blk device `devid` as `role` with `dma`; returns the strategy or the error.
fn try_connect(
    w: &World,
    role: RoleName,
    devid: u32,
    dma: Option<DmaStrategy>,
) -> Result<(DmaStrategy, String), ConnectError> {
    let fe = w.frontend(role);
    let mut opts = Strategy::GrantPersistent.blk();
    opts.connect = ConnectOptions {
        dma,
        timeout: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let dev = fe.connect_blk(devid, &opts)?;
    let n = dev.negotiated().clone();
    dev.write_at(&data(4096, 1), 0).unwrap();
    dev.close().unwrap();
    Ok((n.strategy, n.reason))
}

#[test]
fn each_role_gets_its_default_strategy_from_the_real_backend() {
    let w = World::new();
    let img = w.image("role.img", 1 << 20);
    for (role, want) in [
        (RoleName::Dom0, DmaStrategy::Bounce),
        (RoleName::X86Pv, DmaStrategy::Grant),
        (RoleName::X86Pvh, DmaStrategy::Grant),
        // The daemon trusts domain 1 and the backend is Dom0: grant_usage=0 reaches the guest.
        (RoleName::ArmDomU, DmaStrategy::Direct),
    ] {
        let devid = w.attach_blk_again(role.domid(), &img, None);
        let (strategy, reason) = try_connect(&w, role, devid, None).unwrap();
        assert_eq!(strategy, want, "{role}: {reason}");
        assert!(!reason.is_empty());
    }
}

#[test]
fn the_policy_refuses_what_the_role_forbids_with_the_reason() {
    let w = World::new();
    let img = w.image("refuse.img", 1 << 20);
    let untrusted = 3;
    for (role, domid, dma, reason) in [
        (RoleName::X86Pv, 1, DmaStrategy::Direct, "pseudo-physical"),
        (RoleName::Dom0, 0, DmaStrategy::Direct, "Dom0 must bounce"),
        (
            RoleName::X86Pvh,
            untrusted,
            DmaStrategy::Direct,
            "ACCESS_PLATFORM",
        ),
    ] {
        let devid = w.attach_blk_again(domid, &img, None);
        let fe = w.frontend_as(role, domid);
        let mut opts = Strategy::Direct.blk();
        opts.connect.dma = Some(dma);
        let e = fe.connect_blk(devid, &opts).unwrap_err();
        let text = chain(&e);
        assert!(
            matches!(e, ConnectError::Policy { .. }),
            "{role}: not a policy refusal: {text}"
        );
        assert!(
            text.contains("refused") && text.contains(reason),
            "{role}: {text}"
        );
        // 8.6: the frontend said why and gave up; the backend mapped nothing.
        let info = fe.device(devid).unwrap();
        assert_eq!(info.frontend_state, Some(XenbusState::Closed));
        assert!(info.frontend_error.unwrap().contains(reason));
        assert!(w.pair.backend_holdings(domid).is_nothing());
        // An allowed strategy connects afterwards.
        let dev = fe.connect_blk(devid, &Strategy::Bounce.blk()).unwrap();
        dev.write_at(&data(512, 9), 0).unwrap();
        dev.close().unwrap();
    }
}

/// PROTOCOL 2.2 and 10.5: the backend publishes the effective `grant_usage`, `1` (with
/// ACCESS_PLATFORM) for a guest it does not trust with `direct`, so an Arm guest's policy picks
/// `grant` by itself instead of proposing `direct` and being refused at connect.
#[test]
fn an_untrusted_arm_guest_falls_back_to_grant_by_itself() {
    let w = World::new();
    let img = w.image("untrusted.img", 1 << 20);
    let devid = w.attach_blk(UNTRUSTED, &img, None);
    let fe = w.frontend_as(RoleName::ArmDomU, UNTRUSTED);
    let mut opts = Strategy::GrantPersistent.blk();
    opts.connect.dma = None;
    let dev = fe
        .connect_blk(devid, &opts)
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(dev.negotiated().strategy, DmaStrategy::Grant);
    // The effective grant_usage=1 comes with ACCESS_PLATFORM, which the policy names.
    assert!(
        dev.negotiated().reason.contains("ACCESS_PLATFORM"),
        "{}",
        dev.negotiated().reason
    );
    dev.write_at(&data(4096, 3), 4096).unwrap();
    dev.close().unwrap();
    assert_eq!(read_file_range(&img, 4096, 4096), data(4096, 3));
}

/// Regression: a zero-copy caller holding a queue while a blocking caller polls the same
/// queue used to sleep through its own completions (the poller took the notification and
/// could not reap without the queue), until its timeout.
#[test]
fn zero_copy_and_blocking_callers_share_a_queue_without_losing_wakeups() {
    let w = World::new();
    let img = w.image("share.img", 1 << 20);
    let fe = w.frontend(GUEST);
    let devid = w.attach_blk(F, &img, None);
    let mut opts = Strategy::GrantPersistent.blk();
    opts.io_timeout = Some(Duration::from_secs(5));
    let dev = fe.connect_blk(devid, &opts).unwrap();
    assert_eq!(dev.num_queues(), 1);
    let rounds = 300;
    std::thread::scope(|s| {
        let dev = &dev;
        s.spawn(move || {
            let mut buf = vec![0u8; 8192];
            for i in 0..rounds {
                dev.read_at(&mut buf, (i % 64) * 8192).unwrap();
            }
        });
        s.spawn(move || {
            for i in 0..rounds {
                let mut queue = dev.lock_queue(0);
                for j in 0..4 {
                    let buf = queue.alloc(4096).unwrap();
                    queue.submit_read(buf, (i * 4 + j) % 2048).unwrap();
                }
                let mut done = 0;
                while done < 4 {
                    let got = queue.wait(Some(Duration::from_secs(3))).unwrap();
                    assert!(!got.is_empty(), "round {i}: completions were never noticed");
                    for c in got {
                        c.result.unwrap();
                        done += 1;
                    }
                }
            }
        });
    });
    dev.close().unwrap();
}

/// A frontend in Dom0 served by the backend in Dom0 (both directories owned by Dom0, grants
/// from Dom0 to itself), with every strategy its role allows.
#[test]
fn a_dom0_frontend_uses_every_strategy_its_role_allows() {
    let w = World::new();
    let img = w.image("dom0.img", 1 << 20);
    let fe = w.frontend(RoleName::Dom0);
    for strategy in [
        Strategy::Bounce,
        Strategy::GrantPerRequest,
        Strategy::GrantPersistent,
    ] {
        let devid = w.attach_blk_again(0, &img, None);
        let dev = w.connect_blk(&fe, devid, strategy);
        assert_eq!(dev.negotiated().strategy, strategy.dma());
        let d = data(100_000, devid as u8);
        dev.write_at(&d, 4096).unwrap();
        dev.flush().unwrap();
        assert!(read_file_range(&img, 4096, d.len()) == d, "{strategy:?}");
        dev.close().unwrap();
        eventually("Dom0's own memory is released", || {
            w.pair.backend_holdings(0).is_nothing()
        });
        assert_eq!(w.pair.domain_stats(0).grants, 0, "{strategy:?}");
    }
}
