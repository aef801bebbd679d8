//! The net device against a hostile frontend, and frames in both directions under every
//! strategy: the daemon over the loopback platform, its host side a `SOCK_SEQPACKET` socket
//! (`link = socket:<path>`) that the test holds. Every bad frame is dropped and counted in
//! `dropped`, nothing of it reaches the host side, and the device keeps serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use xenvirtio_backend::daemon::{DaemonConfig, DomainSelector};
use xenvirtio_backend::test_utils::{FramePeer, TestDevice, TestFrontend, TestStrategy};
use xenvirtio_virtio::net::{
    HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM, HDR_SIZE, NetConfig, NetHeader, RECEIVEQ, TRANSMITQ,
};
use xenvirtio_xen::DomId;
use xenvirtio_xen::loopback::LoopbackDomain;

const F: DomId = 5;
const MAC: &str = "00:16:3e:0a:0b:0c";
const WAIT: Duration = Duration::from_secs(10);

/// An Ethernet frame of `len` bytes: broadcast, from the guest's address, IPv4, a pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend([0x00, 0x16, 0x3e, 0x0a, 0x0b, 0x0c, 0x08, 0x00]);
    f.extend((14..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn hdr() -> [u8; HDR_SIZE] {
    NetHeader::default().to_bytes()
}

/// A world with a net device whose host side is `peer`, and a frontend connected to it.
fn setup(
    strategy: TestStrategy,
    mtu: Option<u16>,
) -> (World, FramePeer, TestFrontend<LoopbackDomain>) {
    let w = World::with_config(DaemonConfig {
        max_queue_size: 64,
        allow_direct: vec![DomainSelector::Id(F)],
        ..Default::default()
    });
    let mut peer = FramePeer::listen(&w.dir.path().join("switch.sock")).unwrap();
    let mut dev = TestDevice::net(MAC, peer.path());
    if let Some(m) = mtu {
        dev = dev.with_mtu(m);
    }
    w.attach(F, 0, &for_strategy(dev, strategy));
    peer.accept(WAIT).unwrap();
    let mut o = options(strategy);
    o.queue_size = 64;
    let fe = w.connect(F, 0, o);
    (w, peer, fe)
}

/// Sends one chain on the transmit queue; returns the used length.
fn send(fe: &mut TestFrontend<LoopbackDomain>, parts: &[&[u8]]) -> u32 {
    fe.request(TRANSMITQ, parts, &[]).unwrap().0
}

#[test]
fn net_frames_cross_both_ways_under_every_strategy() {
    for strategy in TestStrategy::ALL {
        let (w, peer, mut fe) = setup(strategy, None);
        let cfg = NetConfig::from_bytes(fe.config());
        assert_eq!(
            cfg.mac,
            [0x00, 0x16, 0x3e, 0x0a, 0x0b, 0x0c],
            "{strategy:?}"
        );
        assert_eq!(
            (cfg.mtu, cfg.max_virtqueue_pairs),
            (1500, 1),
            "{strategy:?}"
        );
        // Out: the header split from the frame, and the frame in two pieces.
        let f = frame(1514, 1);
        assert_eq!(send(&mut fe, &[&hdr(), &f[..700], &f[700..]]), 0);
        let got = peer
            .recv(WAIT)
            .unwrap()
            .expect("the frame reached the host side");
        assert_eq!(
            &got[..HDR_SIZE],
            &[0u8; HDR_SIZE],
            "{strategy:?}: a clean header"
        );
        assert_eq!(
            &got[HDR_SIZE..],
            &f[..],
            "{strategy:?}: the frame, byte for byte"
        );
        // In: a frame from the host side fills one receive buffer behind the device's header.
        let g = frame(60, 2);
        let mut packet = hdr().to_vec();
        packet.extend(&g);
        peer.send(&packet).unwrap();
        let (used, bufs) = fe.request(RECEIVEQ, &[], &[HDR_SIZE + 1518]).unwrap();
        assert_eq!(used as usize, HDR_SIZE + 60, "{strategy:?}");
        let header: [u8; HDR_SIZE] = bufs[0][..HDR_SIZE].try_into().unwrap();
        assert_eq!(NetHeader::from_bytes(&header), NetHeader::received());
        assert_eq!(&bufs[0][HDR_SIZE..HDR_SIZE + 60], &g[..], "{strategy:?}");
        let s = w.stats_when(F, 0, |s| s.requests >= 2);
        assert_eq!(
            (s.bytes_written, s.bytes_read, s.dropped),
            (1514, 60, 0),
            "{strategy:?}: {s:?}"
        );
        fe.close().unwrap();
    }
}

#[test]
fn hostile_net_frame_longer_than_the_mtu() {
    let (w, peer, mut fe) = setup(TestStrategy::GrantPerRequest, Some(1400));
    // 1400 + 14 + 4 is the largest frame; one byte more is dropped unmapped.
    assert_eq!(send(&mut fe, &[&hdr(), &frame(1419, 3)]), 0);
    assert_eq!(
        peer.recv(Duration::from_millis(300)).unwrap(),
        None,
        "nothing went out"
    );
    let s = w.stats_when(F, 0, |s| s.dropped >= 1);
    assert_eq!((s.dropped, s.bytes_written), (1, 0), "{s:?}");
    // The device still serves a frame at the bound.
    assert_eq!(send(&mut fe, &[&hdr(), &frame(1418, 3)]), 0);
    assert_eq!(peer.recv(WAIT).unwrap().unwrap().len(), HDR_SIZE + 1418);
    // From the host side, a frame over the guest's MTU is dropped, the next one delivered.
    let mut big = hdr().to_vec();
    big.extend(frame(1419, 4));
    peer.send(&big).unwrap();
    let mut ok = hdr().to_vec();
    ok.extend(frame(100, 5));
    peer.send(&ok).unwrap();
    let (used, _) = fe.request(RECEIVEQ, &[], &[HDR_SIZE + 1418]).unwrap();
    assert_eq!(used as usize, HDR_SIZE + 100);
    let s = w.stats_when(F, 0, |s| s.dropped >= 2);
    assert_eq!(s.dropped, 2, "{s:?}");
    fe.close().unwrap();
}

#[test]
fn hostile_net_offload_flags_not_offered() {
    let (w, peer, mut fe) = setup(TestStrategy::GrantPersistent, None);
    // CSUM is negotiated, but a partial checksum whose place lies past the frame is not one.
    let outside = NetHeader {
        flags: HDR_F_NEEDS_CSUM,
        csum_start: 190,
        csum_offset: 16,
        ..NetHeader::default()
    };
    assert_eq!(send(&mut fe, &[&outside.to_bytes(), &frame(200, 6)]), 0);
    // A segmentation offload (none is offered), and DATA_VALID, which a driver never sets.
    let gso = NetHeader {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: 1, // TCPv4
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        ..NetHeader::default()
    };
    assert_eq!(send(&mut fe, &[&gso.to_bytes(), &frame(200, 7)]), 0);
    let valid = NetHeader {
        flags: HDR_F_DATA_VALID,
        ..NetHeader::default()
    };
    assert_eq!(send(&mut fe, &[&valid.to_bytes(), &frame(200, 7)]), 0);
    assert_eq!(
        peer.recv(Duration::from_millis(300)).unwrap(),
        None,
        "nothing went out"
    );
    let s = w.stats_when(F, 0, |s| s.dropped >= 3);
    assert_eq!((s.dropped, s.bytes_written), (3, 0), "{s:?}");
    // A partial checksum inside the frame goes out with its place, and nothing else of the
    // guest's header.
    let partial = NetHeader {
        flags: HDR_F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0x5555,
        ..NetHeader::default()
    };
    assert_eq!(send(&mut fe, &[&partial.to_bytes(), &frame(200, 8)]), 0);
    let got = peer.recv(WAIT).unwrap().expect("the frame went out");
    let h: [u8; HDR_SIZE] = got[..HDR_SIZE].try_into().unwrap();
    assert_eq!(
        NetHeader::from_bytes(&h),
        NetHeader {
            flags: HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..NetHeader::default()
        }
    );
    fe.close().unwrap();
}

#[test]
fn hostile_net_tx_chain_with_no_data() {
    let (w, peer, mut fe) = setup(TestStrategy::Bounce, None);
    // A header alone, a header and less than an Ethernet header, and a device-writable
    // buffer in a transmit chain.
    assert_eq!(send(&mut fe, &[&hdr()]), 0);
    assert_eq!(send(&mut fe, &[&hdr(), &[1, 2, 3]]), 0);
    assert_eq!(
        fe.request(TRANSMITQ, &[&hdr(), &frame(60, 8)], &[16])
            .unwrap()
            .0,
        0
    );
    assert_eq!(
        peer.recv(Duration::from_millis(300)).unwrap(),
        None,
        "nothing went out"
    );
    let s = w.stats_when(F, 0, |s| s.dropped >= 3);
    assert_eq!((s.dropped, s.bytes_written), (3, 0), "{s:?}");
    assert_eq!(send(&mut fe, &[&hdr(), &frame(60, 8)]), 0);
    assert!(peer.recv(WAIT).unwrap().is_some(), "the device still sends");
    fe.close().unwrap();
}

#[test]
fn hostile_net_rx_buffer_too_small() {
    let (w, peer, mut fe) = setup(TestStrategy::GrantPerRequest, None);
    let mut p = hdr().to_vec();
    p.extend(frame(1000, 9));
    peer.send(&p).unwrap();
    let mut q = hdr().to_vec();
    q.extend(frame(64, 10));
    peer.send(&q).unwrap();
    // 100 bytes for a 1012-byte packet: returned empty, the frame dropped.
    let (used, bufs) = fe.request(RECEIVEQ, &[], &[100]).unwrap();
    assert_eq!(used, 0);
    assert_eq!(
        bufs[0],
        vec![0u8; 100],
        "nothing was written into the small buffer"
    );
    let (used, bufs) = fe.request(RECEIVEQ, &[], &[HDR_SIZE + 1518]).unwrap();
    assert_eq!(used as usize, HDR_SIZE + 64);
    assert_eq!(&bufs[0][HDR_SIZE..HDR_SIZE + 64], &frame(64, 10)[..]);
    // The counters are published after each batch: wait for the one of the second frame.
    let s = w.stats_when(F, 0, |s| s.dropped >= 1 && s.bytes_read >= 64);
    assert_eq!((s.dropped, s.bytes_read), (1, 64), "{s:?}");
    fe.close().unwrap();
}

#[test]
fn hostile_net_aliased_tx_descriptors_are_refused_unmapped() {
    let w = World::with_config(DaemonConfig {
        max_queue_size: 64,
        ..Default::default()
    });
    let mut peer = FramePeer::listen(&w.dir.path().join("switch.sock")).unwrap();
    w.attach(F, 0, &TestDevice::net(MAC, peer.path()));
    peer.accept(WAIT).unwrap();
    let mut o = options(TestStrategy::Bounce);
    o.arena_pages = 512;
    let mut fe = w.connect(F, 0, o);
    let pool = fe.bounce_pool_bytes() as u32;
    let before = w.stats_when(F, 0, |s| s.state == "Connected").map_calls;
    // 63 descriptors, each the whole 2 MiB pool: 126 MiB of readable bytes.
    let segs: Vec<(u64, u32, bool)> = (0..63).map(|_| (0, pool, false)).collect();
    let t = Instant::now();
    fe.offer_bounce_chain(TRANSMITQ, &hdr(), &segs, None)
        .unwrap();
    let (_, used) = fe.wait_raw_used(TRANSMITQ, WAIT).unwrap();
    let took = t.elapsed();
    assert_eq!(used, 0);
    assert_eq!(
        peer.recv(Duration::from_millis(300)).unwrap(),
        None,
        "nothing went out"
    );
    let s = w.stats_when(F, 0, |s| s.dropped >= 1);
    assert_eq!(
        (s.dropped, s.bytes_written, s.map_calls - before),
        (1, 0, 0),
        "one drop, nothing moved or mapped: {s:?}"
    );
    assert!(
        took < Duration::from_millis(200),
        "the refusal took {took:?}"
    );
    eprintln!("hostile_net_aliased_tx_descriptors: refused in {took:?}, nothing mapped");
    fe.close().unwrap();
}
