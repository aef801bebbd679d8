//! The real net driver against the real daemon in one process, over the loopback hypervisor:
//! under every strategy, thousands of frames each way at once through the device's host side
//! (a frame socket held by the test), each checked in order and byte for byte. Many more frames
//! than the rings and the DMA memory hold: the driver must wait for room, never stall or fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use xenvirtio_backend::admin::{AttachRequest, NetOptions};
use xenvirtio_backend::test_utils::FramePeer;
use xenvirtio_virtio::ids::DeviceKind;
use xenvirtio_virtio::net::HDR_SIZE;

const F: u16 = 1;
const FRAMES: usize = 3000;

/// Frame `i`: broadcast from the guest's address, a length from 60 to 1514, a pattern.
fn frame(i: usize) -> Vec<u8> {
    let len = 60 + (i * 97) % 1455;
    let mut f = vec![0xff; 6];
    f.extend([0x00, 0x16, 0x3e, 0x00, 0x01, 0x03, 0x88, 0xb5]);
    f.extend((14..len).map(|j| (i as u8) ^ (j as u8)));
    f
}

#[test]
fn frames_cross_both_ways_at_once_under_every_strategy() {
    let w = World::new();
    let fe = w.frontend(GUEST);
    for strategy in STRATEGIES {
        let sock = w.dir.path().join(format!("switch-{strategy:?}.sock"));
        let mut peer = FramePeer::listen(&sock).unwrap();
        let mut req = AttachRequest::new(F, DeviceKind::Net);
        req.net = NetOptions {
            mac: Some("00:16:3e:00:01:03".parse().unwrap()),
            socket: Some(sock.clone()),
            ..NetOptions::default()
        };
        let devid = w.pair.attach(&req).unwrap().devid;
        peer.accept(Duration::from_secs(10)).unwrap();
        let dev = Arc::new(fe.connect_net(devid, &strategy.connect()).unwrap());
        assert_eq!(dev.negotiated().strategy, strategy.dma(), "{strategy:?}");
        assert_eq!(dev.mac().to_string(), "00:16:3e:00:01:03");
        assert_eq!(dev.mtu(), 1500);
        let peer = Arc::new(peer);

        // The guest sends while the host side sends to it.
        let sender = {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                for i in 0..FRAMES {
                    assert!(dev.send(&frame(i)).unwrap(), "frame {i} refused");
                }
            })
        };
        let host_sender = {
            let peer = Arc::clone(&peer);
            std::thread::spawn(move || {
                for i in 0..FRAMES {
                    let mut p = vec![0u8; HDR_SIZE];
                    p.extend(frame(i));
                    // The socket blocks while the device holds no receive buffer.
                    peer.send(&p).unwrap();
                }
            })
        };
        let receiver = {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let mut rx = dev.rx().lock().unwrap();
                let mut buf = vec![0u8; 1518];
                for i in 0..FRAMES {
                    let n = rx
                        .recv(&mut buf, Some(Duration::from_secs(20)))
                        .unwrap()
                        .unwrap_or_else(|| panic!("frame {i} never came to the guest"));
                    assert!(buf[..n] == frame(i)[..], "frame {i} to the guest differs");
                }
            })
        };
        // The host side may refuse frames while its socket is full (a TAP drops the same way):
        // what arrives is in order and whole, and every gap is a counted drop.
        let mut next = 0;
        let mut gaps = 0;
        while next < FRAMES {
            let Some(p) = peer.recv(Duration::from_secs(5)).unwrap() else {
                break;
            };
            assert_eq!(&p[..HDR_SIZE], &[0u8; HDR_SIZE]);
            let k = (next..FRAMES)
                .find(|&k| p[HDR_SIZE..] == frame(k)[..])
                .unwrap_or_else(|| {
                    panic!("{strategy:?}: a frame from the guest is none of {next}..")
                });
            gaps += k - next;
            next = k + 1;
        }
        sender.join().unwrap();
        host_sender.join().unwrap();
        receiver.join().unwrap();
        gaps += FRAMES - next;
        // The daemon publishes its counters after each batch: wait for the last one.
        eventually("the daemon's counters cover every frame", || {
            w.pair
                .device_stats(F, devid)
                .is_some_and(|s| s.dropped as usize >= gaps && s.requests as usize >= 2 * FRAMES)
        });
        let s = w.pair.device_stats(F, devid).unwrap();
        assert_eq!(
            s.dropped as usize, gaps,
            "{strategy:?}: every missing frame is a counted drop: {s:?}"
        );
        assert!(
            gaps <= FRAMES / 2,
            "{strategy:?}: {gaps} of {FRAMES} frames dropped"
        );
        eprintln!("{strategy:?}: {FRAMES} frames each way, {gaps} refused by the full host side");
        assert_eq!(
            dev.counters()
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        Arc::try_unwrap(dev).unwrap().close().unwrap();
        eventually("the backend holds nothing of the guest", || {
            w.pair.backend_holdings(F).is_nothing()
        });
    }
}
